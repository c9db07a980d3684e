"""The embedded benchmark chain: the demo teacher's recipes regenerate it, and `make demo` runs end to end."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "assets" / "demo_teacher"
FAST = ("train.report_to=none", "validation.every_steps=0", "checkpoint.every_steps=0", "data.num_workers=0")


def test_demo_teacher_recipes_regenerate_a_teacher(tmp_path):
    """A few steps of both stages give a float16 pipeline of the committed teacher's layout."""
    from diffusers import StableDiffusionPipeline

    from launch.demo_teacher import main
    from trainers.backbones.coord_unet import CoordUNet2DConditionModel

    out = tmp_path / "teacher"
    assert main(["--work", str(tmp_path / "work"), "--out", str(out), "--images", "64", "--vae-steps", "2",
                 "--unet-steps", "2", "train.batch_size=8", "ema.enabled=false", *FAST]) == 0
    vae_scale = json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]
    assert vae_scale != 1.0  # measured from the trained latents by the autoencoder objective
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, CoordUNet2DConditionModel)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 10 * 2**20
    committed = TEACHER / "unet" / "config.json"
    if committed.is_file():  # the committed teacher has the layout its recipes produce
        unset = {"_diffusers_version": None, "_name_or_path": None}  # where and with what it was saved
        assert json.loads(committed.read_text()) | unset == json.loads((out / "unet" / "config.json").read_text()) | unset


def test_the_world_v2_teacher_trains_on_v2_data_with_its_own_tokenizer(tmp_path):
    """--world v2: v2 data for every stage, a tokenizer whose every v2 word is one token, longer captions, a fill
    curriculum stage on one-object scenes that name their fill, then one on two- and three-object scenes; --flow:
    a flow teacher fine-tuned from it, sampled with the flow Euler scheduler, also from a checkpoint."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

    from datasets_prep.synth_world2 import OBJECT_FACTORS
    from launch.demo_teacher import main
    from launch.evaluate import evaluate

    work, out = tmp_path / "work", tmp_path / "teacher2"
    assert main(["--world", "v2", "--work", str(work), "--out", str(out), "--images", "64", "--vae-steps", "2",
                 "--unet-steps", "2", "--fill-steps", "2", "--scenes-steps", "2", "--flow", "--flow-steps", "2", "train.batch_size=8",
                 "ema.enabled=false",
                 *FAST[:2], "checkpoint.every_steps=2", *FAST[3:]]) == 0
    flow = tmp_path / "teacher2_flow"
    assert type(StableDiffusionPipeline.from_pretrained(out).scheduler).__name__ == "DDPMScheduler"
    assert type(StableDiffusionPipeline.from_pretrained(flow).scheduler) is FlowMatchEulerDiscreteScheduler
    assert "schedule: flow" in (work / "runs" / "flow" / "recipe.yaml").read_text()
    result = evaluate(flow, [1], scheduler="euler", guidance=3, prompts=1, images_per_prompt=2, world="v2")
    assert result["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    again = tmp_path / "from_checkpoint"
    assert main(["--world", "v2", "--work", str(work), "--out", str(again), "--from-checkpoint",
                 str(work / "runs" / "flow" / "checkpoints" / "step-2")]) == 0
    assert type(StableDiffusionPipeline.from_pretrained(again).scheduler) is FlowMatchEulerDiscreteScheduler
    fill_rows = [json.loads(line) for line in (work / "data" / "fill" / "metadata.jsonl").read_text().splitlines()]
    assert len(fill_rows) == 25 and all(json.loads(r["spec"])["count"] == 1 for r in fill_rows)
    assert all(("striped" in r["text"]) != ("plain" in r["text"]) for r in fill_rows)  # the curriculum names fill
    assert str(work / "data" / "fill") in (work / "runs" / "fill" / "recipe.yaml").read_text()
    assert (work / "stage2" / "model_index.json").is_file()  # stage 3 went on from stage 2's teacher
    assert (work / "stage3" / "model_index.json").is_file()  # and stage 4 from stage 3's
    scene_rows = [json.loads(r) for r in (work / "data" / "fill_multi" / "metadata.jsonl").read_text().splitlines()]
    assert {json.loads(r["spec"])["count"] for r in scene_rows} == {2, 3}
    described = [(r["text"], [o for o in json.loads(r["spec"])["objects"] if o]) for r in scene_rows]
    assert all(all("fill" in o for o in objects) and text.count("striped") + text.count("plain") == len(objects)
               for text, objects in described)  # every described object's fill is named ("three shapes" names none)
    scenes_recipe = (work / "runs" / "scenes" / "recipe.yaml").read_text()
    assert str(work / "data" / "fill_multi") in scenes_recipe and "model.pretrained" not in scenes_recipe
    assert f"pretrained: {work / 'stage3'}" in scenes_recipe
    committed = ROOT / "assets" / "demo_teacher_v2" / "unet" / "config.json"
    if committed.is_file():  # the committed v2 teacher has the layout its recipes produce
        unset = {"_diffusers_version": None, "_name_or_path": None}
        assert json.loads(committed.read_text()) | unset == json.loads((out / "unet" / "config.json").read_text()) | unset
    fill_recipe = (work / "runs" / "fill" / "recipe.yaml").read_text()  # --fill-steps 2 keeps a decay, as wsd needs
    assert "name: wsd" in fill_recipe and "decay_steps: 1" in fill_recipe and "warmup_steps: 1" in fill_recipe
    first = json.loads((work / "data" / "shapes" / "metadata.jsonl").read_text().splitlines()[0])
    assert "spec" in first and json.loads((work / "data" / "shapes" / "world.json").read_text())["world"] == "v2"
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.tokenizer.model_max_length == 48 == pipe.text_encoder.config.max_position_embeddings
    words = [w for values in OBJECT_FACTORS.values() for v in values for w in v.split()] + ["checkered", "banded"]
    assert all(len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in words)
    flow_recipe = (work / "runs" / "flow" / "recipe.yaml").read_text()  # the flow stage keeps stage 4's mix
    assert str(work / "data" / "fill_multi") in flow_recipe and "name: wsd" in flow_recipe


def test_the_flow_stage_alone_fine_tunes_a_teacher_built_before(tmp_path):
    """--flow-from: the flow stage alone on an existing teacher (the committed one's layout), which gives its VAE
    and tokenizer; nothing of stages 1-4 is trained."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

    from launch.demo_teacher import build_initial, main

    teacher, work = build_initial(tmp_path / "teacher", world="v2"), tmp_path / "work"
    assert main(["--world", "v2", "--work", str(work), "--images", "32", "--flow-from", str(teacher),
                 "--flow-steps", "2", "train.batch_size=8", "ema.enabled=false", *FAST]) == 0
    flow = StableDiffusionPipeline.from_pretrained(tmp_path / "teacher_flow")
    assert type(flow.scheduler) is FlowMatchEulerDiscreteScheduler
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["flow"]  # no VAE, U-Net or fill stage ran
    assert flow.tokenizer.model_max_length == 48


@pytest.mark.skipif(not (TEACHER / "model_index.json").is_file(), reason="no committed demo teacher")
def test_demo_chain_end_to_end(tmp_path):
    from launch.demo import main

    out = tmp_path / "demo"
    assert main(["--out", str(out), "--images", "16", "--prompts", "2", "--images-per-prompt", "1",
                 "--steps", "1,2", "train.max_steps=2", "train.batch_size=4", *FAST,
                 *[f"--lcm={o}" for o in ("train.max_steps=2", "train.batch_size=4", *FAST)],
                 "--edge-images", "16", *[f"--controlnet={o}" for o in ("train.max_steps=2", "train.batch_size=4", *FAST)]]) == 0
    report = (out / "report.md").read_text()
    assert "| teacher | old | 1 |" in report and "| lora | new | 2 |" in report
    assert "| lcm-lora | old | 1 |" in report and "| lcm-lora | old | 2 |" in report
    assert "Run: the shortened chain" in report  # the report says which chain ran
    assert (out / "runs" / "fast" / "lcm_lora" / "final" / "scheduler" / "scheduler_config.json").is_file()
    assert "| teacher alone | empty | 2 |" in report and "| teacher + ControlNet | full | 2 |" in report
    assert (out / "runs" / "fast" / "controlnet" / "final" / "diffusion_pytorch_model.safetensors").is_file()
    control = json.loads((out / "eval" / "controlnet-empty" / "results.json").read_text())
    assert control["captions"] == "empty" and control["controlnet"].endswith("final")
    for png in ("loss.png", "adherence_vs_steps.png", "eval/teacher-old/grid-2.png", "eval/lora-new/grid-1.png"):
        assert (out / png).stat().st_size > 0, png
    results = json.loads((out / "eval" / "teacher-old" / "results.json").read_text())
    assert [r["steps"] for r in results["runs"]] == [1, 2]
    assert all("purple" not in p for p in results["prompts"])
    assert all("purple" in p for p in json.loads((out / "eval" / "lora-new" / "results.json").read_text())["prompts"])


def test_committed_teacher_is_small_and_half_precision():
    if not (TEACHER / "model_index.json").is_file():
        pytest.skip("no committed demo teacher")
    from safetensors import safe_open

    assert sum(f.stat().st_size for f in TEACHER.rglob("*") if f.is_file()) < 10 * 2**20
    for weights in TEACHER.glob("*/*.safetensors"):
        with safe_open(weights, "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys()), weights


def test_the_default_demo_is_the_shortened_chain_and_full_is_the_committed_recipes():
    from launch.demo import FULL, parse_args, plan_from, plan_note

    fast = plan_from(parse_args([]))
    assert fast.name == "fast" and "train.max_steps=400" in fast.lora
    full = plan_from(parse_args(["--full"]))
    assert full == FULL and full.lora == () and full.lcm == () and full.controlnet == ()
    assert "full chain" in plan_note(full) and "shortened chain" in plan_note(fast)
    # what the command line names comes after the preset, so it wins
    mine = plan_from(parse_args(["--prompts", "3", "--lcm", "train.max_steps=7", "train.max_steps=9"]))
    assert mine.prompts == 3 and mine.lcm[-1] == "train.max_steps=7" and mine.lora[-1] == "train.max_steps=9"
    assert set(fast.seconds) | {"distill_v2"} == set(full.seconds)  # both estimate the stages they run
    assert full.distill_v2 and not fast.distill_v2  # the world-v2 students only in the full chain


def test_each_stage_line_says_its_time_and_what_remains(capsys, monkeypatch):
    from launch import demo

    clock = iter([0.0, 10.0, 70.0])
    monkeypatch.setattr(demo.time, "monotonic", lambda: next(clock))
    plan = demo.Plan("t", 1, 1, 1, 1, "1", (), (), (), seconds={"a": 20, "b": 100, "c": 60})
    stages = demo.Stages(plan)
    stages.finished("a", "first")  # 10 s against 20 planned: too short to judge this machine's pace by
    stages.finished("b", "second")  # 70 s for 120 planned: this machine takes 7/12 of the planned time
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[demo 1/3] first: 10 s; 10 s so far, about 160 s left"
    assert lines[1] == "[demo 2/3] second: 60 s; 70 s so far, about 35 s left"


def test_the_full_chain_says_so_when_there_is_no_world_v2_teacher_to_distil(tmp_path, capsys):
    from launch import demo

    stages = demo.Stages(demo.FULL)
    lines = demo.distill_v2(tmp_path / "none", tmp_path / "distill_v2", demo.FULL, stages)
    assert lines[0] == "## Distillation on world v2" and f"no world-v2 teacher at `{tmp_path / 'none'}`" in lines[2]
    assert "world-v2 distillation skipped" in capsys.readouterr().out
    assert demo.distill_v2(tmp_path / "none", tmp_path / "distill_v2", demo.FAST, stages) == []
