"""Bad input ends with exit code 2 and one line naming the problem, never a traceback."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import train
from launch.cli import one_line, run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = "recipes/demo/sd15_lora_tiny.yaml"


def run_train(capsys, *args):
    """launch/train.py in this process: (exit code, stderr)."""
    code = run_cli(train.main, list(args))
    return code, capsys.readouterr().err


def base(tiny, data, tmp):
    return [f"model.pretrained={tiny}", f"data.source={data}", f"output_dir={tmp}/run", "train.max_steps=2",
            "train.report_to=none", "data.num_workers=0", "validation.every_steps=0", "train.batch_size=1"]


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("text, needle", [
    ("output_dir: o\nmodel: {pretrained: m\n", "malformed YAML"),
    ("- just\n- a list\n", "a recipe is a mapping"),
    ("output_dir: o\nmodel: {pretrained: m}\ndata: {source: d}\nadapter: {rnk: 4}\n", "adapter.rnk"),
    ("output_dir: o\nmodel: {pretrained: m}\ndata: {source: d}\ntrain: {max_steps: -1}\n", "train.max_steps"),
    ("output_dir: o\nmodel: {pretrained: m}\ndata: {source: d}\noptimizer: {name: sgd}\n", "optimizer.name"),
    ("output_dir: o\nmodel: {pretrained: m}\n", "data.source"),
])
def test_recipe_errors(capsys, tmp_path, text, needle):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert_one_line_error(*run_train(capsys, str(path)), needle)


def test_missing_recipe_file(capsys, tmp_path):
    assert_one_line_error(*run_train(capsys, str(tmp_path / "nope.yaml")), "recipe file not found")


def test_missing_model_path(capsys, digits_data, tmp_path):
    assert_one_line_error(*run_train(capsys, TINY, *base(tmp_path / "no-model", digits_data, tmp_path)),
                          "model.pretrained", "no-model")


def test_model_folder_missing_a_component(capsys, tiny_sd15, digits_data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd15, broken)
    shutil.rmtree(broken / "vae")
    assert_one_line_error(*run_train(capsys, TINY, *base(broken, digits_data, tmp_path)), "'vae'")


def test_pickled_single_file_is_refused(capsys, digits_data, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    assert_one_line_error(*run_train(capsys, TINY, *base(ckpt, digits_data, tmp_path)), "only .safetensors")


def test_missing_and_empty_data(capsys, tiny_sd15, tmp_path):
    assert_one_line_error(*run_train(capsys, TINY, *base(tiny_sd15, tmp_path / "nodata", tmp_path)), "data.source")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    assert_one_line_error(*run_train(capsys, TINY, *base(tiny_sd15, empty, tmp_path)), "data.source")


def test_all_corrupt_images(capsys, tiny_sd15, tmp_path):
    data = tmp_path / "corrupt"
    data.mkdir()
    with open(data / "metadata.jsonl", "w") as f:
        for i in range(3):
            (data / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
            f.write(json.dumps({"file_name": f"{i}.png", "text": "x"}) + "\n")
    assert_one_line_error(*run_train(capsys, TINY, *base(tiny_sd15, data, tmp_path)), "cannot read image", ".png")


def test_corrupt_image_in_a_worker_is_still_one_line(tiny_sd15, tmp_path):
    data = tmp_path / "corrupt"
    data.mkdir()
    (data / "0.png").write_bytes(b"not an image")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "x"}) + "\n")
    proc = subprocess.run([sys.executable, "launch/train.py", TINY, *base(tiny_sd15, data, tmp_path),
                           "data.num_workers=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, "cannot read image", "0.png")


def test_wrong_caption_column(capsys, tiny_sd15, digits_data, tmp_path):
    assert_one_line_error(*run_train(capsys, TINY, *base(tiny_sd15, digits_data, tmp_path),
                                     "data.caption_column=prompt"), "data.caption_column", "'prompt'")


def test_impossible_combinations(capsys, tiny_sd15, digits_data, tmp_path):
    args = base(tiny_sd15, digits_data, tmp_path)
    assert_one_line_error(*run_train(capsys, TINY, *args, "objective.name=autoencoder"), "adapter.kind")
    assert_one_line_error(*run_train(capsys, TINY, *args, "objective.zero_terminal_snr=true"),
                          "objective.zero_terminal_snr")
    assert_one_line_error(*run_train(capsys, TINY, *args, "memory.attention=xformers"), "memory.attention")
    assert_one_line_error(*run_train(capsys, TINY, *args, "objective.name=dreambooth"), "objective.name")
    assert_one_line_error(*run_train(capsys, TINY, *args, "objective.name=progressive", "ema.enabled=true"),
                          "ema.enabled")
    assert_one_line_error(*run_train(capsys, TINY, *args, "objective.name=consistency",
                                     "objective.caption_dropout=0.1"), "objective.caption_dropout")


def test_resume_from_a_checkpoint_of_another_recipe(capsys, tiny_sd15, digits_data, tmp_path):
    args = base(tiny_sd15, digits_data, tmp_path)
    assert run_train(capsys, TINY, *args, "adapter.rank=4")[0] == 0
    assert_one_line_error(*run_train(capsys, TINY, *args, "adapter.rank=8", "train.max_steps=4"),
                          "resume:", "adapter.rank")
    assert_one_line_error(*run_train(capsys, TINY, *args, f"resume={tmp_path}/nothing"), "resume:")


def test_one_line_unwraps_worker_tracebacks():
    wrapped = ("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               "  File \"x.py\", line 1, in f\ntrainers.errors.UserError: data.source: cannot read image a.png")
    assert one_line(wrapped) == "data.source: cannot read image a.png"


def test_unwritable_output_dir(capsys, tiny_sd15, digits_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = base(tiny_sd15, digits_data, tmp_path)
    assert_one_line_error(*run_train(capsys, TINY, *args, f"output_dir={blocker}/run"), "output_dir", "not a folder")


def test_incomplete_model_folder_fails_before_loading(capsys, tiny_sd15, digits_data, tmp_path):
    broken = tmp_path / "partial"
    shutil.copytree(tiny_sd15, broken)
    shutil.rmtree(broken / "scheduler")  # the last component diffusers would load
    assert_one_line_error(*run_train(capsys, TINY, *base(broken, digits_data, tmp_path)), "'scheduler'")


def test_too_little_disk_for_checkpoints(monkeypatch):
    from trainers import preflight
    from trainers.errors import UserError

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 * 2**20})())
    with pytest.raises(UserError, match="two must fit"):
        preflight.check_disk(Path("."), preflight.checkpoint_bytes(10_000_000, "adamw", ema=True))
    preflight.check_disk(Path("."), preflight.checkpoint_bytes(10_000, "adamw", ema=False))
