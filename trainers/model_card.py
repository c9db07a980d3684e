"""The model card (final/README.md): YAML front matter the hub reads, then usage and the recipe."""
from __future__ import annotations

from pathlib import Path

import yaml

from trainers.config import Recipe, dump_recipe


def write_model_card(final_dir: Path, recipe: Recipe, tags: tuple[str, ...], usage: str,
                     sample_image: str | None = None) -> Path:
    front = {
        "base_model": recipe.model.pretrained,
        "library_name": "diffusers",
        "license": "creativeml-openrail-m",
        "pipeline_tag": "text-to-image",
        "tags": ["text-to-image", "diffusers", "difftune", *tags],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {recipe.name}", "",
             f"Trained with difftune from `{recipe.model.pretrained}` for {recipe.train.max_steps} steps "
             f"(batch {recipe.train.batch_size} x accumulation {recipe.train.grad_accum}, "
             f"lr {recipe.optimizer.lr:g}, {recipe.data.resolution} px).", ""]
    if sample_image:
        lines += [f"![samples]({sample_image})", ""]
    lines += ["## Use", "", "```python", usage.rstrip(), "```", "",
              "## Recipe", "", "```yaml", dump_recipe(recipe).rstrip(), "```", ""]
    path = Path(final_dir) / "README.md"
    path.write_text("\n".join(lines))
    return path
