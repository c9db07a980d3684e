"""The model card (final/README.md): YAML front matter the hub reads, a sample grid, usage, and the recipe.

The front matter follows what diffusers' own training scripts write (`load_or_create_model_card`):
`base_model`, `library_name: diffusers`, `license`, `instance_prompt` for the trigger words, a `widget` for
the sample grid, plus `tags` and `pipeline_tag`. The card never holds a token: it is passed through `redact`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import yaml

from trainers.config import Recipe, dump_recipe
from trainers.hub import redact

BASE_TAGS = ("text-to-image", "diffusers", "diffusers-training", "difftune")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
PRECISION = {"no": "fp32", "fp16": "fp16 mixed", "bf16": "bf16 mixed"}
FILE_NOTES = {  # what each known export file is for; others are listed without a note
    "pytorch_lora_weights.safetensors": "the LoRA in diffusers format, for `pipe.load_lora_weights`",
    "lora_kohya.safetensors": "the same LoRA under kohya key names, for ComfyUI, AUTOMATIC1111 and sd-scripts",
}


def write_model_card(final_dir: Path, recipe: Recipe, tags: Sequence[str], usage: str,
                     sample_image: str | None = None, *, trigger_words: Sequence[str] = (),
                     num_processes: int = 1, license: str = "creativeml-openrail-m",
                     pipeline_tag: str = "text-to-image", trained: str | None = None,
                     family: str | None = None) -> Path:
    """Write final_dir/README.md and return its path.

    Args:
        tags: the objective's tags (lora, lcm, controlnet, ...), after difftune's own.
        usage: Python that loads the export (the objective's `usage_snippet`).
        sample_image: a grid beside the card (relative path), shown and used as the hub widget's output.
        trigger_words: words the training captions carry (the recipe's data.trigger_words).
        num_processes: data-parallel processes, for the effective batch size.
        trained: what was trained where the recipe's adapter section does not say it (the objective's
            `card_trained`, e.g. a ControlNet).
        family: the backbone family (sd15, flux, ...), named in the training table.
    """
    words = tuple(trigger_words)
    front = front_matter(recipe, tags, words, sample_image, license, pipeline_tag)
    files = sorted(p.relative_to(final_dir).as_posix() for p in Path(final_dir).rglob("*.safetensors"))
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {recipe.name}", "", _summary_sentence(recipe, trained), ""]
    if sample_image:
        lines += [f"![samples]({sample_image})", "", _sample_caption(recipe), ""]
    if words:
        shown = ", ".join(f"`{w}`" for w in words)
        lines += ["## Trigger words", "", f"You should use {shown} to trigger the image generation.", ""]
    lines += ["## Use", "", "```python", usage.rstrip(), "```", ""]
    if files:
        lines += ["## Files", ""] + [f"- `{f}`" + (f": {FILE_NOTES[f]}" if f in FILE_NOTES else "") for f in files]
        lines += [""]
    lines += ["## Training", ""] + summary_table(recipe, num_processes, trained, family)
    lines += ["", "The full recipe (`recipe.yaml`), as run:", "", "```yaml", dump_recipe(recipe).rstrip(), "```", ""]
    path = Path(final_dir) / "README.md"
    path.write_text(redact("\n".join(lines)))
    return path


def front_matter(recipe: Recipe, tags: Sequence[str], trigger_words: Sequence[str], sample_image: str | None,
                 license: str, pipeline_tag: str) -> dict:
    """The card's YAML metadata; the hub rejects a base_model that is not a hub id, so local paths are left out."""
    front: dict = {}
    if is_hub_id(recipe.model.pretrained):
        front["base_model"] = recipe.model.pretrained
    front |= {"library_name": "diffusers", "license": license, "pipeline_tag": pipeline_tag,
              "tags": list(dict.fromkeys([*BASE_TAGS, *tags]))}
    if trigger_words:
        front["instance_prompt"] = ", ".join(trigger_words)
    if sample_image:
        text = recipe.validation.prompts[0] if recipe.validation.prompts else recipe.name
        front["widget"] = [{"text": text, "output": {"url": sample_image}}]
    return front


def is_hub_id(ref: str) -> bool:
    """OWNER/NAME that is not a local folder or file (a relative path like demo_out/tiny-sd15 looks the same)."""
    return bool(HUB_ID.match(ref)) and not Path(ref).exists()


ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


def summary_table(recipe: Recipe, num_processes: int = 1, trained: str | None = None,
                  family: str | None = None) -> list[str]:
    """The settings that decide a result, as Markdown table rows."""
    r, ad, t = recipe, recipe.adapter, recipe.train
    objective = r.objective.name + (f" ({r.objective.prediction_type})" if r.objective.prediction_type else "")
    adapter = trained or (f"{ADAPTER_NAMES[ad.kind]}, rank {ad.rank}, alpha {ad.alpha:g}"
                          + (", + text encoder" if ad.text_encoder else "") if ad.low_rank else "full fine-tune")
    batch = (f"{t.batch_size} x {t.grad_accum} accumulation x {num_processes} "
             f"process{'es' if num_processes != 1 else ''} = {t.batch_size * t.grad_accum * num_processes}")
    ls = r.lr_schedule
    schedule = (ls.name + (f", {ls.warmup_steps} warmup steps" if ls.warmup_steps else "")
                + (f", {ls.decay_steps} decay steps" if ls.decay_steps else ""))
    rows = [("Base model", f"`{r.model.pretrained}`" + (f" ({family})" if family else "")),
            ("Objective", objective), ("Trained", adapter),
            ("Steps", str(t.max_steps)), ("Batch", batch),
            ("Learning rate", f"{r.optimizer.lr:g} ({r.optimizer.name}), {schedule}"),
            ("Resolution", f"{r.data.resolution} px"),
            ("Precision", f"{PRECISION[r.precision]}, exported as {r.export.dtype}"),
            ("EMA", f"decay {r.ema.decay:g}" if r.ema.enabled else "off"), ("Seed", str(t.seed))]
    return ["| Setting | Value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _summary_sentence(recipe: Recipe, trained: str | None = None) -> str:
    kind = trained or (f"a {ADAPTER_NAMES[recipe.adapter.kind]}" if recipe.adapter.low_rank else "a full fine-tune")
    return (f"Trained with difftune (objective `{recipe.objective.name}`, {kind}) from `{recipe.model.pretrained}` "
            f"for {recipe.train.max_steps} steps.")


def _sample_caption(recipe: Recipe) -> str:
    v = recipe.validation
    prompts = "; ".join(f'"{p}"' for p in v.prompts) or "the validation prompts"
    conditioning = (f" Conditioning images: {', '.join(f'`{Path(c).name}`' for c in v.conditioning_images)}."
                    if v.conditioning_images else "")
    return (f"Rows: {prompts}. {v.images_per_prompt} image(s) per prompt, {v.steps} {v.scheduler} steps, "
            f"guidance {v.guidance_scale:g}, seed {v.seed}.{conditioning}")
