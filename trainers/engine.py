"""The one training loop. Every recipe runs through `Trainer.fit`; objectives only say what the loss is.

The engine owns the accelerator, optimizers and LR schedules, gradient accumulation, precision, clipping, EMA,
checkpoints and resume, the progress bar, trackers and validation cadence. An objective's update groups
(`Objective.update_groups`: usually one) each have an optimizer; at engine step s every group whose period
divides s takes one update, in the order declared, on the same micro-batches. Which groups step is a pure function
of s, so a run resumes exactly between any two steps of an alternation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainers import checkpoint, integrity, memory, optimizers, preflight, quantize, seeding, trackers
from trainers.backbones import load_backbone
from trainers.backbones.loading import empty_weights
from trainers.config import Recipe, dump_recipe
from trainers.data import StepSampler, build_dataset, collate, make_loader
from trainers.ema import EMA
from trainers.errors import UserError
from trainers.guards import NonFiniteGuard
from trainers.hub import push_folder
from trainers.model_card import write_model_card
from trainers.objectives import get_objective
from trainers.signals import StopRequest
from trainers.strategies import strategy_for
from trainers.validation import sample_grid

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OBJECTIVE_PREFIX = "objective."  # checkpoint keys of the objective's own state (an EMA target, a stage's teacher)


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None  # None when stopped before max_steps
    step: int
    last_loss: float | None
    stopped: bool = False  # a stop signal ended the run early, after a checkpoint


class Trainer:
    def __init__(self, recipe: Recipe, dry_run: bool = False):
        """dry_run: build the models from their configs on the meta device (no weights read, nothing trains), for
        parameter counts and a memory estimate of any size on any machine."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.recipe, self.out, self.dry_run = recipe, Path(recipe.output_dir), dry_run
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not _has_device():
            # accelerate would quietly run plain DDP on CPU processes (it shards only over GPUs)
            raise UserError("FSDP (accelerate_configs/fsdp.yaml) needs GPUs; without one use "
                            "accelerate_configs/cpu_ddp.yaml or cpu_zero2.yaml")
        trackers.check(recipe)
        objective_cls = get_objective(recipe.objective.name)
        self.accelerator = Accelerator(
            cpu=_cpu_processes(), kwargs_handlers=_process_group_kwargs(objective_cls.ddp_find_unused_parameters),
            gradient_accumulation_steps=recipe.train.grad_accum,
            mixed_precision=recipe.precision,
            log_with=trackers.log_with(recipe),
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        if self.accelerator.num_processes != _launched_processes():
            raise UserError(f"{_launched_processes()} processes were launched but accelerate joined "
                            f"{self.accelerator.num_processes} ({self.accelerator.distributed_type}): each would train "
                            "alone into the same output_dir. Without GPUs use accelerate_configs/cpu_ddp.yaml "
                            "or cpu_zero2.yaml (FSDP needs GPUs)")
        self.device, self.is_main = self.accelerator.device, self.accelerator.is_main_process
        optimizers.check(recipe)
        self.strategy = strategy_for(self.accelerator, recipe, self.device, DTYPES[recipe.precision])
        preflight.check_output_dir(self.out)
        checkpoint.check_fresh_start(recipe.resume, self.out)
        preflight.check_model_folder(recipe)
        self.dataset = build_dataset(recipe.data, recipe.model,  # bad data fails before the models load
                                     conditioning=objective_cls.needs_conditioning_images)
        self.heldout = heldout_dataset(recipe)
        seeding.seed_everything(recipe.train.seed)
        if recipe.memory.quantize_base != "none":
            quantize.check(recipe, objective_cls, self.strategy.sharded)
        with empty_weights() if dry_run else contextlib.nullcontext():
            self.backbone = load_backbone(recipe.model)
        self.backbone.check_resolution(recipe.data.resolution)
        if recipe.memory.quantize_base != "none" and not dry_run:  # before the LoRA wraps the layers
            quantize.quantize_linears(self.backbone.denoiser, recipe.memory.quantize_base, DTYPES[recipe.precision])
        self.objective = objective_cls(recipe, self.backbone)
        if self.heldout is not None and not self.objective.has_heldout_loss:
            raise UserError(f"validation.loss_source: the {recipe.objective.name} objective has no held-out loss")
        self.groups = self.objective.update_groups()
        self._check_groups()  # before the backend's own checks: their advice assumes one optimizer
        self.strategy.check(self.objective.trained_modules())
        self.objective.to(torch.device("meta") if dry_run else self.device, DTYPES[recipe.precision],
                          inputs_cached=getattr(self.dataset, "cache", None) is not None)
        memory.configure(self.objective.memory_modules(), self.backbone.denoiser_key, recipe.memory,
                         self.objective.recompute_context)
        self.params = self.objective.trainable_named_parameters()
        first = {id(p) for g in self.groups[:1] for pg in g.param_groups for p in pg["params"]}
        self.ema = EMA({k: p for k, p in self.params.items() if id(p) in first}, recipe.ema.decay) \
            if recipe.ema.enabled else None
        self.nonfinite = NonFiniteGuard(self.device, recipe.train.max_nonfinite_steps)
        trainable = self.parameter_counts()[0]
        try:
            warning = preflight.check_disk(self.out, preflight.checkpoint_bytes(trainable, recipe.optimizer.name,
                                                                                recipe.ema.enabled),
                                           recipe.checkpoint.keep_last, export_bytes=2 * 4 * trainable)
        except UserError as error:
            if not dry_run:
                raise
            warning = str(error)  # a dry run reports it with the estimate: it is what the run would stop on
        self.disk_warning = warning
        if warning and self.is_main and not dry_run:
            tqdm.write(warning)

    def _check_groups(self) -> None:
        """Several optimizers: what the backends cannot split between them is refused by name."""
        if len(self.groups) == 1:
            return
        names = ", ".join(g.name for g in self.groups)
        if self.strategy.sharded:
            raise UserError(f"objective.name: {self.recipe.objective.name} trains {len(self.groups)} parameter groups "
                            f"with their own optimizers ({names}); DeepSpeed ZeRO shards one: use "
                            "accelerate_configs/multi_gpu.yaml (DDP) instead")
        for group in self.groups:
            if group.optimizer.name in optimizers.AVERAGING:
                raise UserError(f"the {group.name} optimizer: {group.optimizer.name} averages the weights it exports, "
                                f"which a run of several optimizers ({names}) cannot keep apart; use adamw")

    def _frozen_parameters(self) -> list[torch.nn.Parameter]:
        trained = {id(p) for p in self.params.values()}
        components = [self.backbone.denoiser, self.backbone.vae, *self.backbone.text_encoders.values()]
        return [p for m in components for p in m.parameters() if id(p) not in trained]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, frozen) parameter counts over every component (quantised weights counted unpacked)."""
        trainable = sum(p.numel() for p in self.params.values())
        return trainable, sum(quantize.logical_numel(p) for p in self._frozen_parameters())

    def memory_estimate(self) -> int:
        """Bytes for weights, gradients, optimizer state and EMA; activations depend on batch and resolution."""
        trainable = self.parameter_counts()[0]
        frozen_bytes = sum(p.numel() * p.element_size() for p in self._frozen_parameters())  # as held: cast, 8/4-bit
        if self.dry_run and self.recipe.memory.quantize_base != "none":  # nothing was quantised on the meta device
            frozen_bytes -= quantize.bytes_saved(self.backbone.denoiser, self.recipe.memory.quantize_base)
        gradients = trainable * 4
        return frozen_bytes + gradients + preflight.checkpoint_bytes(
            trainable, self.recipe.optimizer.name, self.ema is not None)

    def fit(self, until: int | None = None) -> TrainResult:
        """Train to train.max_steps and export; with `until`, stop after that step with a checkpoint only."""
        r, acc = self.recipe, self.accelerator
        last = min(until, r.train.max_steps) if until is not None else r.train.max_steps
        self._prepare()
        start = self._resume()
        if self.is_main:
            _keep_metrics_until(self.out / "logs" / "metrics.jsonl", start)
        sampler = StepSampler(self.dataset.buckets(), r.train.batch_size, r.train.grad_accum, r.train.seed,
                              start_step=start, world_size=acc.num_processes, rank=acc.process_index)
        if sampler.unused() and self.is_main:
            tqdm.write(f"warning: {sampler.unused()} images sit in buckets smaller than a global batch "
                       f"({sampler.global_batch}) and are never trained on")
        batches = iter(make_loader(self.dataset, sampler, r.data.num_workers))
        sums: dict[str, torch.Tensor] = {}
        tick, last_loss, step, interval, stopped = time.perf_counter(), None, start, 0, False
        with StopRequest() as stop, tqdm(total=r.train.max_steps, initial=start, desc=r.name, dynamic_ncols=True,
                                         disable=not self.is_main,
                                         mininterval=0.5 if sys.stderr.isatty() else 30) as bar:  # logs: 30 s
            for step in range(start + 1, last + 1):
                self._optimizer_step(batches, step, sums)
                bar.update(1)
                interval += 1
                log_step = step % r.train.log_every == 0 or step == r.train.max_steps
                if log_step:
                    last_loss = self._log(step, sums, interval, time.perf_counter() - tick, bar)
                    sums, tick, interval = {}, time.perf_counter(), 0
                if r.checkpoint.every_steps and step % r.checkpoint.every_steps == 0:
                    self.save_checkpoint(step)
                if r.validation.every_steps and step % r.validation.every_steps == 0:
                    self.validate(step)
                if self._stop_agreed(stop.requested, log_step):
                    stopped = True  # the caller says so, naming the checkpoint (launch/train.py's last line)
                    break
        if not checkpoint.step_dir(self.out, step).exists():
            self.save_checkpoint(step)
        done = step == r.train.max_steps and not stopped
        if done and step > start:
            every = r.checkpoint.every_steps
            self.nonfinite.check_progress(max(start, (step - 1) // every * every if every else start), step)
        final = self.export() if done else None
        if final and r.hub.push and self.is_main:
            try:
                tqdm.write(f"pushed to {push_folder(final, r.hub.repo_id, r.hub.private, r.hub.revision)}")
            except UserError as e:
                raise UserError(f"{e} (final/ is saved: push it later with "
                                f"`python launch/push.py {self.out} --repo-id {r.hub.repo_id}`)") from None
        acc.end_training()
        return TrainResult(self.out, final, step, last_loss, stopped)

    def _optimizer_step(self, batches, step: int, sums: dict) -> None:
        """Engine step `step`: each due update group steps once over the step's grad_accum micro-batches."""
        micro = [next(batches) for _ in range(self.recipe.train.grad_accum)]
        for i, (group, optimizer) in enumerate(zip(self.groups, self.optimizers)):
            if step % group.every == 0:
                self._update(i, group, optimizer, micro, step, sums)

    def _update(self, index: int, group, optimizer, micro: list, step: int, sums: dict) -> None:
        """One optimizer update; metrics accumulate on the device, unsynced."""
        acc = self.accelerator
        factor = self.lr_factors[index](step - 1)
        for g, base in zip(optimizer.param_groups, self.base_lrs[index]):
            g["lr"] = base * factor
        loss_fn = group.loss or self.objective.loss
        for batch in micro:
            # accumulate(): gradients are all-reduced (DDP) and DeepSpeed steps only on the last micro-batch;
            # backward() divides the loss by grad_accum (DeepSpeed by its own, equal, gradient_accumulation_steps)
            with acc.accumulate(*self.objective.wrapped.values()):
                loss, logs = loss_fn(batch, step)
                acc.backward(loss)
            for k, v in logs.items():
                total, count = sums.get(k, (0, 0))
                sums[k] = (total + v / len(micro), count + (batch is micro[0]))
        params = [p for g in group.param_groups for p in g["params"]]
        finite = torch.isfinite(self.strategy.grad_norm(params, group.optimizer.max_grad_norm))
        self.nonfinite.record(finite, step)
        self.strategy.step(optimizer, finite, self.nonfinite)
        for each in self.optimizers:  # another group's gradients from this loss (through a shared module) go too
            each.zero_grad(set_to_none=True)
        if index == 0:
            self.objective.after_step(finite)
            if self.ema:
                self.ema.update(keep=finite)

    def _stop_agreed(self, requested: bool, log_step: bool) -> bool:
        """One process stops at once; several agree at log steps, the loop's only sync points."""
        if self.accelerator.num_processes == 1:
            return requested
        if not log_step:
            return False
        flag = torch.tensor(float(requested), device=self.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    def _prepare(self) -> None:
        """Wrap the trained modules and the optimizer (DDP, autocast, loss scaling, DeepSpeed)."""
        acc, r = self.accelerator, self.recipe
        names, modules = zip(*self.objective.trained_modules().items())
        for m in modules:
            m.train()
        made = [optimizers.make_optimizer(g.param_groups, g.optimizer) for g in self.groups]
        wrapped, self.optimizer = self.strategy.prepare(modules, made[0])
        self.optimizers = [self.optimizer, *(acc.prepare(o) for o in made[1:])]  # DeepSpeed: one (_check_groups)
        self.objective.use_wrapped(dict(zip(names, wrapped)))
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]
        self.lr_factors = [optimizers.lr_factor(g.lr_schedule.name, g.lr_schedule.warmup_steps, r.train.max_steps,
                                                g.lr_schedule.decay_steps) for g in self.groups]
        if self.is_main:
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(dump_recipe(r))
            trackers.start(acc, r, self.out)

    def _log(self, step: int, sums: dict, interval: int, seconds: float, bar) -> float:
        """Reduce the interval's mean metrics across processes: the only host sync of the loop."""
        means = {k: self.accelerator.reduce(torch.as_tensor(total, device=self.device) / count, "mean").item()
                 for k, (total, count) in sums.items()}  # a group's figures over the steps it updated in
        means |= {f"lr_{g.name}": o.param_groups[0]["lr"] for g, o in zip(self.groups[1:], self.optimizers[1:])}
        means |= {"lr": self.optimizer.param_groups[0]["lr"], "steps_per_s": interval / max(seconds, 1e-9),
                  "skipped_steps": self.nonfinite.check(step), **optimizers.logs(self.optimizer)}
        self.accelerator.log(means, step=step)
        if self.is_main:
            if "loss" in means:  # a step where only another update group stepped has none
                bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr']:.2e}")
            with open(self.out / "logs" / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **means}) + "\n")
        return means.get("loss")

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": p for k, p in self.params.items()}
        tensors |= self.ema.state_dict() if self.ema else {}
        return tensors | {OBJECTIVE_PREFIX + k: v for k, v in self.objective.state_for_checkpoint().items()}

    def save_checkpoint(self, step: int) -> None:
        """The main process writes the checkpoint; under DeepSpeed every process first adds its ZeRO shard."""
        acc = self.accelerator
        acc.wait_for_everyone()
        state = self.strategy.save_optimizer(self.optimizer, self.out, step, self.is_main)
        if self.is_main:
            for group, optimizer in zip(self.groups[1:], self.optimizers[1:]):
                state[f"optimizer.{group.name}"] = optimizer.state_dict()
            if acc.scaler is not None:
                state["scaler"] = acc.scaler.state_dict()
            checkpoint.save(self.out, step, self.checkpoint_tensors(), state, {"name": self.recipe.name},
                            self.recipe.checkpoint.keep_last, staged=self.strategy.sharded)
        acc.wait_for_everyone()

    def export_checkpoint(self, out: Path) -> Path:
        """Export the checkpoint recipe.resume names, as the run's end would (e.g. a progressive run's 8-step student)."""
        path = self._choose_checkpoint()
        if path is None:
            raise UserError(f"resume: no checkpoint to export in {self.out}")
        state, meta = self._load_weights(path)
        if self.recipe.optimizer.name in optimizers.AVERAGING:  # its averaged weights need the optimizer's state
            self.optimizer = optimizers.make_optimizer(self.objective.param_groups(), self.recipe.optimizer)
            self.strategy.load_optimizer(self.optimizer, path, state)
        return self.export(out, until_step=int(meta["step"]))

    def _load_weights(self, path: Path) -> tuple[dict, dict]:
        """Trained weights, EMA and the objective's state from a checkpoint; returns its training state and meta."""
        tensors, state, meta = checkpoint.load(path)
        checkpoint.check_matches(path, tensors, {f"model.{k}": p for k, p in self.params.items()})
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[f"model.{k}"])
        if self.ema:
            self.ema.load_state_dict(tensors)
        self.objective.load_checkpoint_state(without_prefix(tensors, OBJECTIVE_PREFIX))
        return state, meta

    def _choose_checkpoint(self) -> Path | None:
        """Every process verifies and picks the same checkpoint; then the main one moves the damaged aside."""
        choice = checkpoint.choose(self.recipe.resume, self.out)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            for line in checkpoint.set_aside(choice.damaged):
                tqdm.write(line)
            if choice.path is not None and not choice.recorded:
                tqdm.write(f"note: {choice.path} predates integrity records: checked that its files read and its "
                           "weights are finite, not their digests")
        self.accelerator.wait_for_everyone()
        return choice.path

    def _resume(self) -> int:
        path = self._choose_checkpoint()
        if path is None:
            return 0
        state, meta = self._load_weights(path)
        self.strategy.load_optimizer(self.optimizer, path, state)
        for group, optimizer in zip(self.groups[1:], self.optimizers[1:]):
            if f"optimizer.{group.name}" not in state:
                raise UserError(f"resume: {path} holds no optimizer state of the {group.name!r} update group (another "
                                "objective wrote it): use a new output_dir or resume: none")
            optimizer.load_state_dict(state[f"optimizer.{group.name}"])
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if self.is_main:
            tqdm.write(f"resumed from {path} (step {meta['step']})")
        return int(meta["step"])

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """The objective's loss on validation.loss_source at fixed timesteps; each image's noise fixed by its index."""
        cfg = self.recipe.validation
        timesteps = torch.tensor(cfg.loss_timesteps, device=self.device)
        total, count = 0.0, 0
        for bucket in self.heldout.buckets():
            for start in range(0, len(bucket), self.recipe.train.batch_size):
                keys = [(int(i), seeding.mix(cfg.seed, int(i))) for i in bucket[start:start + self.recipe.train.batch_size]]
                with self.accelerator.autocast():
                    loss = self.objective.heldout_loss(collate([self.heldout[k] for k in keys]), timesteps)
                total, count = total + loss.item() * len(keys), count + len(keys)
        return total / count

    def validate(self, step: int) -> Path | None:
        """Sample the validation prompts and score the held-out loss on the main process; others wait."""
        with optimizers.averaged_weights(self.optimizer):  # schedule-free: validate the weights it would export
            return self._validate(step)

    def _validate(self, step: int) -> Path | None:
        cfg, path = self.recipe.validation, None
        if self.is_main and self.heldout is not None:
            value = self.heldout_loss()
            self.accelerator.log({"val_loss": value}, step=step)
            with open(self.out / "logs" / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "val_loss": value}) + "\n")
        if self.is_main and cfg.prompts:
            with self.objective.on_device_for_sampling():
                grid = sample_grid(self.objective.validation_pipeline(), cfg, self.recipe.data.resolution,
                                   self.accelerator.autocast, **self.backbone.sampling_kwargs(),
                                   **self.objective.validation_inputs())
            path = self.out / "samples" / f"step-{step}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            trackers.log_image(self.accelerator, self.recipe, grid, step)
        self.accelerator.wait_for_everyone()
        return path

    def export(self, final: Path | None = None, until_step: int | None = None) -> Path:
        """Write final/ (or `final`) atomically: the objective's artefacts, a model card and the resolved recipe."""
        final = Path(final) if final is not None else self.out / "final"
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if self.ema:
                self.ema.copy_to_params()
            tmp = final.parent / f".tmp-{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with optimizers.averaged_weights(getattr(self, "optimizer", None)):  # schedule-free exports x
                self._write_export(tmp, until_step)
            grids = [(checkpoint.step_of(p.with_suffix("")), p) for p in (self.out / "samples").glob("step-*.png")]
            samples = [p for n, p in sorted(g for g in grids if g[0] is not None)
                       if until_step is None or n <= until_step]
            if samples:
                shutil.copy(samples[-1], tmp / "samples.png")
            write_model_card(tmp, self.recipe, (*self.backbone.card_tags, *self.objective.card_tags),
                             self.objective.usage_snippet(str(final)), "samples.png" if samples else None,
                             trigger_words=self.recipe.data.trigger_words, license=self.backbone.license,
                             num_processes=self.accelerator.num_processes, trained=self.objective.card_trained(),
                             family=self.backbone.family)
            (tmp / "recipe.yaml").write_text(dump_recipe(self.recipe))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        self.accelerator.wait_for_everyone()
        return final


    def _write_export(self, tmp: Path, until_step: int | None) -> None:
        """The objective's artefacts, refused if any weight is non-finite; a full disk is one line (DiskFull)."""
        step = until_step if until_step is not None else self.recipe.train.max_steps
        try:
            self.objective.export(tmp)
        except Exception as error:
            needed = sum(p.numel() * p.element_size() for p in self.params.values())
            reason = integrity.disk_error(error, tmp, needed)
            if reason is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            intact = checkpoint.complete_checkpoints(self.out)
            raise integrity.disk_full(f"the export of step {step}", tmp.parent, needed, reason,
                                      intact[-1] if intact else None) from None
        try:
            integrity.refuse_nonfinite(tmp, f"export of step {step} refused")
        except UserError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def without_prefix(tensors: dict, prefix: str) -> dict:
    """The entries whose key starts with `prefix`, keyed by the rest."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def heldout_dataset(recipe: Recipe):
    """validation.loss_source read like data.source (same resolution and cache rules), its first loss_samples."""
    cfg = recipe.validation
    if cfg.loss_source is None:
        return None
    data = dataclasses.replace(recipe.data, source=cfg.loss_source, max_samples=cfg.loss_samples, repeats=1,
                               loss_weight=1.0, extra_sources=(), random_flip=False)
    try:
        return build_dataset(data, recipe.model)
    except UserError as e:
        raise UserError(f"validation.loss_source: {e}") from None


def _keep_metrics_until(path: Path, step: int) -> None:
    """The log continues the run that is resumed: rows of a fresh start's predecessor, or those an interrupted run
    wrote after its last checkpoint, would otherwise stand twice for the same steps."""
    if not path.is_file():
        return
    def kept_row(row: str) -> bool:
        try:
            return json.loads(row).get("step", 0) <= step
        except ValueError:  # a line cut short when the process died mid-write
            return False

    rows = path.read_text().splitlines(keepends=True)
    kept = [row for row in rows if row.strip() and kept_row(row)]
    if len(kept) != len(rows):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _launched_processes() -> int:
    """How many processes the launcher (torchrun, mpirun) started; 1 for plain `python launch/train.py`."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def _has_device() -> bool:
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return acc.is_available() if acc is not None else torch.cuda.is_available()


def _launched_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _cpu_processes() -> bool:
    """torchrun started several processes on a machine without GPUs (accelerate would leave each alone)."""
    return _launched_processes() > 1 and not _has_device() and not _launched_deepspeed()


def _process_group_kwargs(find_unused_parameters: bool = False) -> list:
    """DeepSpeed on several CPU processes: name gloo, or accelerate finds no backend and reports 1 process.

    (accelerate(cpu=True) would drop DeepSpeed altogether.) Without a backend accelerate calls every rank the main
    process of 1 while DeepSpeed joins all of them, and fills train_batch_size for 1 process, which DeepSpeed
    rejects. With gloo named, both agree: ranks 0..n-1 of n.

    find_unused_parameters: an objective whose update groups share a DDP-wrapped module leaves one group's weights
    without a gradient in the other's updates; DDP must look for them or it waits for their all-reduce forever.
    """
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    if _launched_processes() > 1 and not _has_device() and _launched_deepspeed():
        return [*kwargs, InitProcessGroupKwargs(backend="gloo")]
    return kwargs


def train(recipe: Recipe) -> TrainResult:
    return Trainer(recipe).fit()
