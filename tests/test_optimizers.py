"""Prodigy and schedule-free AdamW: the options a recipe names, what they log and export, and exact resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

from trainers import optimizers
from trainers.errors import ConfigError
from trainers.engine import Trainer

LORA_FILE = "pytorch_lora_weights.safetensors"
PRODIGY = ("optimizer.name=prodigy", "optimizer.lr=1.0", "lr_schedule.name=constant", "lr_schedule.warmup_steps=0")
SCHEDULE_FREE = ("optimizer.name=adamw_schedulefree", "optimizer.lr=1e-2", "lr_schedule.name=constant",
                 "lr_schedule.warmup_steps=2")


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overrides, key", [
    (("optimizer.d0=1e-5",), "optimizer.d0"),  # a Prodigy option under adamw
    (("optimizer.name=prodigy", "optimizer.lr=1e-4"), "optimizer.lr"),  # a hand-tuned step where 1.0 belongs
    (("optimizer.name=prodigy", "optimizer.lr=1.0", "optimizer.text_encoder_lr=5e-5"), "optimizer.text_encoder_lr"),
    (("optimizer.name=adamw_schedulefree", "lr_schedule.name=cosine"), "lr_schedule.name"),
    (("lr_schedule.name=wsd",), "lr_schedule.decay_steps"),  # wsd without its decay
    (("lr_schedule.name=wsd", "train.max_steps=10", "lr_schedule.warmup_steps=4", "lr_schedule.decay_steps=7"),
     "lr_schedule.decay_steps"),  # a decay longer than what follows the warmup
    (("lr_schedule.name=cosine", "lr_schedule.decay_steps=5"), "lr_schedule.decay_steps"),
    (("optimizer.name=adamw_schedulefree", "lr_schedule.name=constant", "ema.enabled=true"), "ema.enabled"),
    (("optimizer.name=adamw_schedulefree", "lr_schedule.name=constant", "objective.name=progressive"),
     "optimizer.name"),
])
def test_combinations_an_optimizer_cannot_honour_name_the_key(recipe_for, tmp_path, overrides, key):
    recipe = recipe_for(*overrides)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        optimizers.check(recipe)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        Trainer(recipe)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_wsd_is_constant_until_its_decay_and_lengthening_a_stable_run_changes_nothing_before_it():
    """Warmup-stable-decay: the factor a run saw before its decay began is the same whatever max_steps it ends
    at, so a run resumed with a larger train.max_steps follows the exact path a longer run would have."""
    short, long = optimizers.lr_factor("wsd", 4, 100, 20), optimizers.lr_factor("wsd", 4, 300, 20)
    assert [short(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]  # warmup as every schedule's
    assert [short(s) for s in range(4, 81)] == [long(s) for s in range(4, 81)] == [1.0] * 77
    assert [short(s) for s in (80, 90, 99)] == [1.0, 0.5, 0.05] and long(290) == 0.5


def test_prodigy_adapts_its_step_size_logs_it_and_resume_keeps_it(recipe_for, tmp_path):
    args = (*PRODIGY, "train.max_steps=6", "train.log_every=1", "checkpoint.every_steps=3")
    Trainer(recipe_for(*args, out=tmp_path / "straight")).fit()
    d = [m["prodigy_d"] for m in metrics(tmp_path / "straight") if "prodigy_d" in m]
    assert len(d) == 6 and d[0] == 1e-6 and d[-1] > 5 * d[0]  # grew from d0 = 1e-6: it adapted
    assert all(b >= a for a, b in zip(d, d[1:]))
    state = torch.load(tmp_path / "straight" / "checkpoints" / "step-3" / "training_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["d"] == pytest.approx(d[2])  # in the checkpoint

    Trainer(recipe_for(*args, out=tmp_path / "split")).fit(until=3)
    Trainer(recipe_for(*args, "resume=auto", out=tmp_path / "split")).fit()
    resumed = [m["prodigy_d"] for m in metrics(tmp_path / "split") if "prodigy_d" in m]
    assert resumed == d
    a, b = (load_file(tmp_path / run / "final" / LORA_FILE) for run in ("straight", "split"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-7


def test_schedule_free_exports_its_averaged_weights_not_the_training_point(recipe_for, tmp_path):
    trainer = Trainer(recipe_for(*SCHEDULE_FREE, "train.max_steps=5"))
    exported = {}
    export = trainer.objective.export

    def capture(out_dir):
        exported.update({k: p.detach().clone() for k, p in trainer.params.items()})
        return export(out_dir)

    trainer.objective.export = capture
    trainer.fit()
    inner = trainer.optimizer.optimizer
    beta1 = inner.param_groups[0]["betas"][0]
    trained = {k: p for k, p in trainer.params.items() if "z" in inner.state[p]}
    assert trained and inner.param_groups[0]["train_mode"] is True  # back in train mode after the export
    for k, y in trained.items():  # x = y + (1 - 1/beta1) (z - y): the optimizer's own eval() formula
        x = torch.lerp(y.detach(), inner.state[y]["z"], 1 - 1 / beta1)
        torch.testing.assert_close(exported[k], x, rtol=0, atol=1e-7)
    assert max((exported[k] - y).abs().max().item() for k, y in trained.items()) > 1e-4  # x is not y


def test_schedule_free_validation_leaves_training_bit_identical_and_resume_is_exact(recipe_for, tmp_path):
    args = (*SCHEDULE_FREE, "train.max_steps=6", "train.log_every=1", "checkpoint.every_steps=3")
    Trainer(recipe_for(*args, out=tmp_path / "straight")).fit()
    validated = Trainer(recipe_for(*args, "validation.every_steps=1", "validation.prompts=[a digit]",
                                   "validation.steps=2", out=tmp_path / "validated"))
    validated.fit()
    losses = [[m["loss"] for m in metrics(tmp_path / run) if "loss" in m] for run in ("straight", "validated")]
    assert losses[0] == losses[1]  # the y -> x -> y round trip around each validation is exact

    Trainer(recipe_for(*args, out=tmp_path / "split")).fit(until=3)
    Trainer(recipe_for(*args, "resume=auto", out=tmp_path / "split")).fit()
    a, b = (load_file(tmp_path / run / "final" / LORA_FILE) for run in ("straight", "split"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-7


def test_a_schedule_free_checkpoint_exports_the_averaged_weights_too(recipe_for, tmp_path):
    args = (*SCHEDULE_FREE, "train.max_steps=4", "checkpoint.every_steps=4")
    Trainer(recipe_for(*args)).fit()
    again = Trainer(recipe_for(*args, "resume=auto")).export_checkpoint(tmp_path / "again")
    a, b = (load_file(p / LORA_FILE) for p in (tmp_path / "run" / "final", again))
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


@pytest.mark.parametrize("name,kept,absent", [
    ("adafactor", {"exp_avg_sq_row", "exp_avg_sq_col"}, "exp_avg"),            # no first moment at all
    ("came", {"exp_avg", "exp_avg_sq_row", "exp_avg_res_col"}, "exp_avg_sq"),  # a first moment, factored second
])
def test_factored_optimizers_keep_factored_moments_and_resume_exactly(name, kept, absent, recipe_for, tmp_path):
    """A full fine-tune: each matrix's second moment (and CAME's instability moment) is a row and a column vector, no
    (out, in) moment, and a run split by a resume ends where an unbroken one does."""
    args = (f"optimizer.name={name}", "optimizer.lr=1e-4", "adapter.kind=full", "train.max_steps=4",
            "checkpoint.every_steps=2", "export.dtype=float32")
    trainer = Trainer(recipe_for(*args, out=tmp_path / "straight"))
    trainer.fit()
    state = trainer.optimizer.optimizer.state
    matrices = [p for p in trainer.params.values() if p.dim() == 2 and p in state]
    assert matrices and all(kept <= set(state[p]) and absent not in state[p] for p in matrices)
    Trainer(recipe_for(*args, out=tmp_path / "split")).fit(until=2)
    Trainer(recipe_for(*args, "resume=auto", out=tmp_path / "split")).fit()
    a, b = (load_file(tmp_path / run / "final" / "unet" / "diffusion_pytorch_model.safetensors")
            for run in ("straight", "split"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-7
