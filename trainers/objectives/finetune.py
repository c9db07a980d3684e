"""Fine-tuning: the denoising loss of Ho et al. (2020) on a LoRA or on the whole denoiser.

Per sample: draw t and eps, form z_t = alpha_t x0 + sigma_t eps, and regress the model's output on its
target (eps or v), optionally weighted by min-SNR-gamma. The caption is replaced by the empty prompt with
probability `caption_dropout`, which is what classifier-free guidance needs at sampling time.
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainers import adapters, kohya, seeding
from trainers.devices import cast
from trainers.errors import ConfigError
from trainers.losses import denoising_error, denoising_loss
from trainers.objectives import inputs
from trainers.objectives.base import Objective, export_single_file


class FineTune(Objective):
    name = "finetune"
    exports_adapter_only = True

    def __init__(self, recipe, backbone):
        super().__init__(recipe, backbone)
        obj, ad = recipe.objective, recipe.adapter
        self.schedule = self.training_schedule(obj.zero_terminal_snr)
        self.denoiser = backbone.denoiser
        self.trained_encoders: dict[str, torch.nn.Module] = {}
        if ad.low_rank:
            start = self.load_kohya(ad.init_from) if ad.init_from else None
            if start is None:
                adapters.add_lora(self.denoiser, ad, ad.target_modules or backbone.lora_targets)
            for name in backbone.trainable_text_encoders:
                encoder = backbone.text_encoders[name]
                if start is not None and name in start.text_encoders:
                    kohya.load_lora(encoder, start.text_encoders[name], start.alphas, name, ad)
                elif ad.text_encoder:
                    adapters.add_lora(encoder, ad, ad.text_encoder_target_modules)
                else:
                    continue
                self.trained_encoders[name] = encoder
        else:
            self.denoiser.requires_grad_(True)
            if ad.text_encoder:  # e.g. a model trained from scratch learns its own text encoder
                for name in backbone.trainable_text_encoders:
                    self.trained_encoders[name] = backbone.text_encoders[name].requires_grad_(True)
        self._uncond = None  # the unconditional text input, once (frozen text encoders only)

    def load_kohya(self, path: str):
        """Start from a kohya-format LoRA: the U-Net adapter now, the text encoders' ones for the caller."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if self.backbone.family not in kohya.FAMILIES:
            raise ConfigError(f"'adapter.init_from': kohya LoRAs exist for {', '.join(kohya.FAMILIES)}, "
                              f"not {self.backbone.family}")
        try:
            state = load_file(path)
        except (OSError, SafetensorError) as e:
            raise ConfigError(f"'adapter.init_from': cannot read {path}: {e}") from None
        start = kohya.from_kohya(state, kohya.family_for(self.backbone.family, self.denoiser))
        if start.kind != self.recipe.adapter.kind:
            raise ConfigError(f"'adapter.kind' is {self.recipe.adapter.kind} but adapter.init_from {path} holds a "
                              f"{start.kind}: set adapter.kind: {start.kind} to go on from it")
        kohya.load_lora(self.denoiser, start.unet, start.alphas, kohya.UNET, self.recipe.adapter)
        return start

    def trained_modules(self):
        return {self.backbone.denoiser_key: self.denoiser, **self.trained_encoders}

    def to(self, device, frozen_dtype, inputs_cached: bool = False):
        """Frozen parts in the compute dtype; with cached inputs the VAE and frozen encoders stay on the CPU."""
        self.device = torch.device(device)
        full = self.recipe.adapter.kind == "full"
        vae_fp32 = self.backbone.vae.config.get("force_upcast", False)  # SDXL's VAE overflows in fp16
        frozen_encoders = [m for k, m in self.backbone.text_encoders.items() if k not in self.trained_encoders]
        self.offloaded = [self.backbone.vae, *frozen_encoders] if inputs_cached else []
        for module in [self.backbone.vae, *self.backbone.text_encoders.values(), self.denoiser]:
            trained = module is self.denoiser or any(module is m for m in self.trained_encoders.values())
            fp32 = (full and trained) or (vae_fp32 and module is self.backbone.vae)
            dtype = torch.float32 if fp32 else frozen_dtype
            if module not in self.offloaded:
                module.to(self.device)
            if next(module.parameters()).dtype != dtype:  # diffusers warns on any cast: only when needed (a
                cast(module, dtype)                        # model saved in float16 loads in float16)
        for p in self.trainable_named_parameters().values():
            p.data = p.data.float()  # master weights in float32 under mixed precision
        self.schedule.to(self.device)

    def param_groups(self):
        opt = self.recipe.optimizer
        groups = [{"params": [p for p in self.denoiser.parameters() if p.requires_grad], "lr": opt.lr}]
        for encoder in self.trained_encoders.values():
            groups.append({"params": [p for p in encoder.parameters() if p.requires_grad],
                           "lr": opt.text_encoder_lr if opt.text_encoder_lr is not None else opt.lr})
        return groups

    def loss(self, batch, step):
        x0 = inputs.latents(self.backbone, batch, self.device)  # (B, C, h, w)
        cond = self.condition(batch, batch["seeds"])
        denoiser = self.wrapped[self.backbone.denoiser_key]
        obj = self.recipe.objective
        loss = denoising_loss(x0, batch, self.schedule, lambda z_t, t: self.backbone.predict(z_t, t, cond, denoiser),
                              obj.snr_gamma, obj.noise_offset, obj.mask_floor)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def heldout_loss(self, batch, timesteps):
        """Unweighted loss on the model's own target, every caption kept, the same noise at every timestep."""
        seeds = batch["seeds"]
        x0 = inputs.latents(self.backbone, batch, self.device)
        cond = self.backbone.condition(batch["captions"], [False] * len(seeds), batch, self.device,
                                       self.backbone.text_encoders, text=inputs.cached_text(batch, self.device))
        eps = seeding.randn(seeds, seeding.NOISE, x0.shape[1:], self.device)
        predict = lambda z_t, t: self.backbone.predict(z_t, t, cond, self.denoiser)  # noqa: E731
        errors = [denoising_error(self.schedule, predict, x0, eps, t.expand(len(seeds)).to(self.device))
                  for t in self.schedule.at_train_timesteps(timesteps)]
        return torch.stack(errors).mean()

    def condition(self, batch, seeds):
        """Text (and family-specific) conditioning; a caption is dropped with p = caption_dropout, seeded.

        Frozen text encoders: cached text tensors are used when the batch has them, and the unconditional
        input is computed once.
        """
        obj = self.recipe.objective
        dropped = inputs.dropped_captions(seeds, obj.caption_dropout,
                                          self.backbone.text_groups if obj.caption_dropout_per_encoder else None)
        if self.trained_encoders:
            encoders = {**self.backbone.text_encoders, **{k: self.wrapped[k] for k in self.trained_encoders}}
            return self.backbone.condition(batch["captions"], dropped, batch, self.device, encoders)
        with torch.no_grad():
            if inputs.any_dropped(dropped) and self._uncond is None:
                where = "cpu" if self.offloaded else self.device
                self._uncond = {k: v.to(self.device) for k, v in self.backbone.unconditional(where).items()}
            return self.backbone.condition(batch["captions"], dropped, batch, self.device,
                                           text=inputs.cached_text(batch, self.device), uncond=self._uncond)

    def validation_pipeline(self):
        return self.backbone.pipeline(self.denoiser, self.backbone.text_encoders, self.schedule.sampling_scheduler())

    def export(self, out_dir: Path) -> list[Path]:
        dtype = getattr(torch, self.recipe.export.dtype)
        if self.recipe.adapter.low_rank:
            if self.recipe.adapter.lycoris:  # peft's own layout; diffusers' loader reads LoRA and DoRA only
                files = adapters.save_peft(out_dir, self.trained_modules(), dtype)
            else:
                files = [adapters.save_lora(out_dir, self.backbone.pipeline_class(), self.backbone.denoiser_key,
                                            self.denoiser, self.trained_encoders, dtype)]
            kohya_file = export_single_file(out_dir, self.trained_modules(), self.backbone.family, self.recipe,
                                            dtype)
            files += [kohya_file] if kohya_file else []
            if self.changes_noise_process:  # the base's scheduler would sample the LoRA wrongly: ship the trained one
                self.schedule.sampling_scheduler().save_pretrained(out_dir / "scheduler")
                files.append(out_dir / "scheduler")
            return files
        written = []
        for key, module in self.trained_modules().items():
            cast(module, dtype).save_pretrained(out_dir / key, safe_serialization=True)
            module.float()
            written.append(out_dir / key)
        self.schedule.sampling_scheduler().save_pretrained(out_dir / "scheduler")
        return [*written, out_dir / "scheduler"]

    def usage_snippet(self, where: str) -> str:
        cls = self.backbone.pipeline_class()
        pipe = cls.__name__
        lib = "diffusers" if cls.__module__.startswith("diffusers") else cls.__module__  # our own pipelines
        base = self.recipe.model.pretrained
        if self.recipe.adapter.lycoris:
            names = list(self.trained_modules())
            return (f"import torch\nfrom {lib} import {pipe}\nfrom peft import PeftConfig, inject_adapter_in_model, "
                    f"set_peft_model_state_dict\nfrom safetensors.torch import load_file\n\n"
                    f"pipe = {pipe}.from_pretrained({base!r}, torch_dtype=torch.float16)\n"
                    f"for name in {names!r}:  # each trained component's {self.recipe.adapter.kind} in peft's layout\n"
                    f"    folder = f\"{where}/{{name}}\"\n"
                    f"    inject_adapter_in_model(PeftConfig.from_pretrained(folder), getattr(pipe, name))\n"
                    f"    set_peft_model_state_dict(getattr(pipe, name), load_file(f\"{{folder}}/adapter_model.safetensors\"))\n"
                    f"pipe.to(\"cuda\")\nimage = pipe(\"your prompt\", num_inference_steps=25).images[0]\n"
                    f"# ComfyUI / A1111 / Forge: load {kohya.KOHYA_WEIGHTS} (LyCORIS key names) as a LoRA\n")
        if self.recipe.adapter.low_rank:
            scheduler = (f"pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained({where!r}, "
                         f"subfolder=\"scheduler\")  # trained by rectified flow\n" if self.changes_noise_process else "")
            imports = f"{pipe}, FlowMatchEulerDiscreteScheduler" if scheduler and lib == "diffusers" else pipe
            extra = "from diffusers import FlowMatchEulerDiscreteScheduler\n" if scheduler and lib != "diffusers" else ""
            return (f"import torch\n{extra}from {lib} import {imports}\n\n"
                    f"pipe = {pipe}.from_pretrained({base!r}, torch_dtype=torch.float16).to(\"cuda\")\n"
                    f"pipe.load_lora_weights({where!r})\n{scheduler}"
                    f"image = pipe(\"your prompt\", num_inference_steps=25).images[0]\n")
        key = self.backbone.denoiser_key
        model = type(self.denoiser).__name__
        return (f"import torch\nfrom {lib} import {pipe}, {model}\n\n"
                f"{key} = {model}.from_pretrained({where!r}, subfolder={key!r}, torch_dtype=torch.float16)\n"
                f"pipe = {pipe}.from_pretrained({base!r}, {key}={key}, torch_dtype=torch.float16).to(\"cuda\")\n"
                f"image = pipe(\"your prompt\", num_inference_steps=25).images[0]\n")

    @property
    def changes_noise_process(self) -> bool:
        """Trained on another noise process than the base model's (objective.schedule: flow on a VP model)."""
        return self.schedule.kind != self.backbone.schedule.kind

    @property
    def card_tags(self):
        return {"lora": ("lora",), "dora": ("lora", "dora"), "loha": ("lycoris", "loha"),
                "lokr": ("lycoris", "lokr")}.get(self.recipe.adapter.kind, ("full-finetune",))

