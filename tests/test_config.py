"""trainers/config.py: schema, overrides and the errors a user sees."""
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.config import Recipe, apply_override, dump_recipe, from_dict, load_recipe, to_dict
from trainers.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def minimal(**extra):
    return {"output_dir": "out", "model": {"pretrained": "m"}, "data": {"source": "d"}, **extra}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates_and_opens_with_its_command(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    head = path.read_text().splitlines()[0]
    assert head.startswith("#") and "launch/train.py" in path.read_text().split("\n\n")[0]


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"sd15_lora.yaml", "sd15_full.yaml", "sd15_lora_tiny.yaml", "sd15_controlnet.yaml", "sdxl_controlnet.yaml",
            "sd15_controlnet_tiny.yaml"} <= names


def test_defaults_fill_everything_but_required():
    r = from_dict(minimal())
    assert r.train.batch_size == 1 and r.adapter.kind == "lora" and r.resume == "auto"
    assert r.adapter.target_modules is None  # the family's own LoRA targets


@pytest.mark.parametrize("data, message", [
    (minimal(train={"max_stpes": 3}), "unknown key 'train.max_stpes' (did you mean 'train.max_steps'?)"),
    (minimal(trian={}), "unknown key 'trian'"),
    (minimal(train={"batch_size": "four"}), "'train.batch_size' must be int, got str 'four'"),
    (minimal(train={"batch_size": 2.5}), "'train.batch_size' must be int"),
    (minimal(train={"batch_size": 0}), "'train.batch_size' must be at least 1, got 0"),
    (minimal(ema={"enabled": 1}), "'ema.enabled' must be bool"),
    (minimal(precision="fp8"), "'precision' must be one of 'no', 'fp16', 'bf16'; got str 'fp8'"),
    (minimal(objective={"caption_dropout": 1.5}), "'objective.caption_dropout' must be between 0.0 and 1.0"),
    (minimal(optimizer={"betas": [0.9]}), "'optimizer.betas' must be a list of 2 values"),
    (minimal(validation={"prompts": "a cat"}), "'validation.prompts' must be a list"),
    (minimal(model="sd15"), "'model' must be a mapping"),
    ({"output_dir": "o", "data": {"source": "d"}}, "missing required key 'model.pretrained'"),
    # an objective's own section is checked against the Options its module declares
    (minimal(objective={"name": "consistency", "consistency": {"skp": 2}}),
     "unknown key 'objective.consistency.skp' (did you mean 'objective.consistency.skip'?)"),
    (minimal(objective={"consistency": {"solver": "heun"}}), "'objective.consistency.solver' must be one of"),
    (minimal(objective={"progressive": {"teacher_steps": 1}}), "'objective.progressive.teacher_steps' must be at least 2"),
    (minimal(objective={"consistncy": {}}), "unknown key 'objective.consistncy' (did you mean 'objective.consistency'?)"),
    (minimal(objective={"finetune": {}}), "'objective.finetune': the finetune objective has no options of its own"),
    (minimal(objective={"name": "distil"}), "'objective.name' must be one of 'finetune'"),
    (minimal(objective={"sections": {}}), "unknown key 'objective.sections'"),
])
def test_schema_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert message in str(e.value)


def test_objective_sections_load_default_and_dump_under_their_names():
    r = from_dict(minimal(objective={"name": "consistency", "consistency": {"skip": 3}}))
    assert r.objective.consistency.skip == 3 and r.objective.consistency.solver == "ddim"
    assert r.objective.progressive.teacher_steps == 64  # a section the recipe did not set: its defaults
    dumped = to_dict(r)["objective"]
    assert dumped["consistency"]["skip"] == 3 and "sections" not in dumped
    assert from_dict({**to_dict(r)}) == r  # the resolved recipe reads back as itself


def test_numbers_are_coerced_where_harmless():
    r = from_dict(minimal(optimizer={"lr": "1e-4", "weight_decay": 0}))
    assert r.optimizer.lr == 1e-4 and isinstance(r.optimizer.weight_decay, float)


def test_bare_no_means_the_choice_not_false():
    data = minimal()
    apply_override(data, "precision=no")  # YAML 1.1 reads it as false
    assert from_dict(data).precision == "no"
    with pytest.raises(ConfigError, match="'train.report_to' must be one of"):
        from_dict(minimal(train={"report_to": False}))


def test_overrides_parse_yaml_values():
    data = minimal()
    for item in ["train.max_steps=7", "optimizer.lr=3e-4", "adapter.text_encoder=true",
                 "validation.prompts=[a, b c]", "ema.decay=0.99"]:
        apply_override(data, item)
    r = from_dict(data)
    assert (r.train.max_steps, r.optimizer.lr, r.adapter.text_encoder) == (7, 3e-4, True)
    assert r.validation.prompts == ("a", "b c") and r.ema.decay == 0.99
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override(data, "no-equals-sign")


def test_resolved_recipe_round_trips(tmp_path):
    r = from_dict(minimal(train={"max_steps": 5}, validation={"prompts": ["x"]}))
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(r))
    assert load_recipe(path) == r


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("output_dir: o\nmodel:\n  pretrained: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: malformed YAML"):
        load_recipe(path)


def test_cli_misspelled_key_exits_2_naming_it(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("output_dir: o\nmodel: {pretrained: m}\ndata: {source: d}\ntrain: {bach_size: 2}\n")
    proc = subprocess.run([sys.executable, "launch/train.py", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.bach_size" in proc.stderr and "train.batch_size" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bad_override_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "launch/train.py", str(RECIPES[0]), "train.max_steps=lots"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "train.max_steps" in proc.stderr and "Traceback" not in proc.stderr
