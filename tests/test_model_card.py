"""trainers/model_card.py: the front matter the hub reads, the summary table, the recipe, and no token."""
from __future__ import annotations


import pytest
import yaml

from trainers.config import from_dict, to_dict
from trainers.model_card import write_model_card

USAGE = "pipe.load_lora_weights('me/tiny-lora')\nimage = pipe('sks digit').images[0]\n"


def make_recipe(**sections):
    data = {"output_dir": "run", "name": "tiny-lora", "model": {"pretrained": "org/base-model"},
            "data": {"source": "data", "resolution": 768},
            "adapter": {"rank": 8, "alpha": 16},
            "train": {"max_steps": 300, "batch_size": 2, "grad_accum": 4, "seed": 7},
            "optimizer": {"lr": 5e-5}, "lr_schedule": {"name": "cosine", "warmup_steps": 10},
            "precision": "bf16", "validation": {"prompts": ["sks digit seven", "sks digit two"]}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(data)


def card(tmp_path, recipe=None, tags=("lora",), **kw):
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"w")
    (tmp_path / "lora_kohya.safetensors").write_bytes(b"w")
    text = write_model_card(tmp_path, recipe or make_recipe(), tags, USAGE, **kw).read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body, text


def test_front_matter_as_diffusers_lora_cards(tmp_path):
    from huggingface_hub import ModelCard

    front, body, text = card(tmp_path, tags=("lora", "lcm"), sample_image="samples.png", trigger_words=("sks", "digit"))
    assert front["base_model"] == "org/base-model"
    assert front["library_name"] == "diffusers" and front["license"] == "creativeml-openrail-m"
    assert front["pipeline_tag"] == "text-to-image"
    assert front["tags"] == ["text-to-image", "diffusers", "diffusers-training", "difftune", "lora", "lcm"]
    assert front["instance_prompt"] == "sks, digit"  # what the hub widget and diffusers' cards use
    assert front["widget"] == [{"text": "sks digit seven", "output": {"url": "samples.png"}}]
    assert ModelCard(text).data.to_dict()["instance_prompt"] == "sks, digit"  # huggingface_hub reads it back
    assert "![samples](samples.png)" in body and '"sks digit seven"; "sks digit two"' in body
    assert "You should use `sks`, `digit` to trigger the image generation." in body
    assert f"```python\n{USAGE}```" in body
    assert "- `lora_kohya.safetensors`: the same LoRA under kohya key names" in body


def test_without_trigger_words_or_samples(tmp_path):
    front, body, _ = card(tmp_path)
    assert "instance_prompt" not in front and "widget" not in front
    assert "![samples]" not in body and "Trigger words" not in body


def test_local_base_model_stays_out_of_the_front_matter(tmp_path):
    base = tmp_path / "tiny-sd15"
    base.mkdir()
    out = tmp_path / "final"
    out.mkdir()
    front, body, _ = card(out, recipe=make_recipe(model={"pretrained": str(base)}))
    assert "base_model" not in front  # the hub rejects a base_model that is not a hub id
    assert f"| Base model | `{base}` |" in body


def test_summary_table_before_the_full_recipe(tmp_path):
    recipe = make_recipe(ema={"enabled": True, "decay": 0.999})
    _, body, _ = card(tmp_path, recipe=recipe, num_processes=3)
    rows = ["| Base model | `org/base-model` |", "| Objective | finetune |", "| Trained | LoRA, rank 8, alpha 16 |",
            "| Steps | 300 |", "| Batch | 2 x 4 accumulation x 3 processes = 24 |",
            "| Learning rate | 5e-05 (adamw), cosine, 10 warmup steps |", "| Resolution | 768 px |",
            "| Precision | bf16 mixed, exported as float32 |", "| EMA | decay 0.999 |", "| Seed | 7 |"]
    for row in rows:
        assert row in body, row
    table, recipe_yaml = body.split("```yaml\n")
    assert all(row in table for row in rows)
    assert yaml.safe_load(recipe_yaml.split("```")[0]) == to_dict(recipe)


def test_full_fine_tune_row(tmp_path):
    _, body, _ = card(tmp_path, recipe=make_recipe(adapter={"kind": "full"}), tags=("full-finetune",))
    assert "| Trained | full fine-tune |" in body and "a full fine-tune" in body


@pytest.mark.parametrize("token", ["hf_" + "Ab1" * 11 + "c", "a-plain-secret-1234"])
def test_card_never_holds_the_token(tmp_path, monkeypatch, token):
    monkeypatch.setenv("HF_TOKEN", token)
    recipe = make_recipe(validation={"prompts": [f"oops {token}"]})  # pasted into a prompt by mistake
    _, _, text = card(tmp_path, recipe=recipe, sample_image="samples.png")
    assert token not in text and "oops ***" in text
