"""UViTPipeline: text-to-image sampling with a U-ViT on SD's VAE and CLIP, with any diffusers scheduler.

It saves and loads like any diffusers pipeline. diffusers finds a folder's pipeline class by the name in
model_index.json on the `diffusers` package and its components by module path among imported modules, so
importing this module makes a saved U-ViT folder loadable with `DiffusionPipeline.from_pretrained(folder)`:

    import trainers.backbones.uvit_pipeline  # registers UViTPipeline and UViT2DModel with diffusers
    pipe = DiffusionPipeline.from_pretrained("path/to/uvit")
    pipe.load_lora_weights("runs/uvit_lora/final")
"""
import inspect
from typing import Callable

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from trainers.backbones.uvit_model import UViT2DModel


class UViTLoraLoaderMixin(SD3LoraLoaderMixin):
    """diffusers' LoRA I/O for a transformer plus one CLIP text encoder (SD3's mixin, less its second encoder).

    Files hold peft-spelled keys (`transformer.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`)
    and each adapter's LoraConfig in the safetensors metadata, so loading uses the trained alpha / r.
    """

    _lora_loadable_modules = ["transformer", "text_encoder"]

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap: bool = False,
                          **kwargs):
        """Load a LoRA file or folder (`weight_name=` picks the file) into the transformer and text encoder."""
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        state_dict, metadata = self.read_lora(pretrained_model_name_or_path_or_dict, **kwargs)
        common = dict(adapter_name=adapter_name, metadata=metadata, _pipeline=self,
                      low_cpu_mem_usage=low_cpu_mem_usage, hotswap=hotswap)
        self.load_lora_into_transformer(state_dict, transformer=self.transformer, **common)
        self.load_lora_into_text_encoder(state_dict, network_alphas=None, text_encoder=self.text_encoder,
                                         prefix=self.text_encoder_name, lora_scale=self.lora_scale, **common)

    def read_lora(self, source, **kwargs) -> tuple[dict, dict]:
        """The LoRA state dict and its metadata from a file, folder or dict (the caller's dict is left whole)."""
        source = dict(source) if isinstance(source, dict) else source  # diffusers pops from it
        state_dict, metadata = self.lora_state_dict(source, return_lora_metadata=True, **kwargs)
        if not all("lora" in k for k in state_dict):
            raise ValueError("Invalid LoRA checkpoint: every key must contain 'lora'.")
        return state_dict, metadata

    @classmethod
    def save_lora_weights(cls, save_directory, transformer_lora_layers: dict | None = None,
                          transformer_lora_adapter_metadata: dict | None = None,
                          text_encoder_lora_layers: dict | None = None,
                          text_encoder_lora_adapter_metadata: dict | None = None,
                          is_main_process: bool = True, weight_name: str | None = None,
                          save_function: Callable | None = None, safe_serialization: bool = True):
        """Write one LoRA file: peft-spelled state dicts and their LoraConfig dicts, per component."""
        layers, metadata = {}, {}
        for name, sd, meta in (("transformer", transformer_lora_layers, transformer_lora_adapter_metadata),
                               ("text_encoder", text_encoder_lora_layers, text_encoder_lora_adapter_metadata)):
            if sd:
                layers[name], metadata[name] = sd, meta
        if not layers:
            raise ValueError("Pass transformer_lora_layers or text_encoder_lora_layers.")
        cls._save_lora_weights(save_directory=save_directory, lora_layers=layers, lora_metadata=metadata,
                               is_main_process=is_main_process, weight_name=weight_name,
                               save_function=save_function, safe_serialization=safe_serialization)

    def fuse_lora(self, components: list[str] = ["transformer", "text_encoder"], **kwargs):  # noqa: B006
        super().fuse_lora(components=components, **kwargs)

    def unfuse_lora(self, components: list[str] = ["transformer", "text_encoder"], **kwargs):  # noqa: B006
        super().unfuse_lora(components=components, **kwargs)


class UViTPipeline(DiffusionPipeline, UViTLoraLoaderMixin):
    """Sample a U-ViT: classifier-free guidance against the empty prompt, any diffusers scheduler, VAE decode."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 transformer: UViT2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def encode_prompt(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """CLIP's last hidden states, (B, 77, D), as U-ViT and SD condition on."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 4.0, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True):
        """Images for `prompt`; guidance_scale <= 1 disables classifier-free guidance.

        eps_hat = eps(z, "") + w * (eps(z, c) - eps(z, "")) (Ho & Salimans 2021), w = guidance_scale.
        output_type: "pil", "np", "pt" or "latent".
        """
        from trainers.schedulers import for_vp_pipeline

        for_vp_pipeline(self.scheduler)  # a rectified-flow U-ViT samples with FlowMatchEulerDiscreteScheduler
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        side = self.transformer.config.sample_size * self.vae_scale_factor
        height, width = height or side, width or side
        device, dtype = self._execution_device, self.transformer.dtype
        cond = self.encode_prompt(prompts, device).to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        batch, guided = cond.shape[0], guidance_scale > 1.0
        if guided:
            cond = torch.cat([self.encode_prompt([""], device).to(dtype).expand(batch, -1, -1), cond])
        shape = (batch, self.transformer.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) if latents is None \
            else latents.to(device, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters \
            else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            x = self.scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            pred = self.transformer(x, t, encoder_hidden_states=cond).sample
            if guided:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample
        images = latents if output_type == "latent" else self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def decode(self, latents: torch.Tensor, output_type: str):
        """Undo the VAE's latent scaling (z / scaling_factor + shift_factor), decode, convert."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)


def _register_with_diffusers() -> None:
    """`DiffusionPipeline.from_pretrained` resolves model_index.json's `_class_name` on the diffusers package."""
    import diffusers

    for cls in (UViTPipeline, UViT2DModel):
        setattr(diffusers, cls.__name__, cls)


_register_with_diffusers()
