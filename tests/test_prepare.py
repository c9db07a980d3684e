"""`prepare`: every source kind gives the same records, a resumed run equals a clean one, and the CLI contract."""

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from datasets_prep import prepare as prepare_module
from datasets_prep.prepare import PrepareOptions, prepare
from prep_images import (add_member, good_samples, write_acceptance_source, write_caption_folder, write_hf_dataset,
                         write_imagefolder, write_parquet, write_tars)
from trainers.errors import UserError

REPO = Path(__file__).resolve().parents[1]
OPTIONS = PrepareOptions(resolution=256, max_pixels=200_000, shard_rows=3, group_rows=2)
FIELDS = ("caption", "width", "height", "original_width", "original_height", "crop_top", "crop_left", "bucket",
          "sha256")


def rows(out: Path) -> list[dict]:
    """Every shard row, in shard order, as progress.json lists them."""
    names = [entry["name"] for entry in json.loads((out / "progress.json").read_text())["shards"]]
    return [row for name in names for row in pq.read_table(out / "shards" / name).to_pylist()]


def comparable(row: dict) -> tuple:
    """The fields that must not depend on the source kind, plus a hash of the decoded pixels."""
    pixels = hashlib.sha256(Image.open(io.BytesIO(row["image"])).tobytes()).hexdigest()
    return tuple(row[f] for f in FIELDS) + (pixels,)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datasets_prep", *args], cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """The ten good images as a caption folder, prepared once as the reference."""
    root = tmp_path_factory.mktemp("good")
    folder = write_caption_folder(root / "captions", good_samples())
    prepare([str(folder)], root / "reference", OPTIONS)
    return root


@pytest.mark.parametrize("kind", ["imagefolder", "hf_dataset", "webdataset", "parquet"])
def test_every_source_kind_gives_the_same_records(good, tmp_path, kind):
    writers = {"imagefolder": write_imagefolder, "hf_dataset": write_hf_dataset, "webdataset": write_tars,
               "parquet": lambda path, samples: write_parquet(path / "data" / "train.parquet", samples).parent.parent}
    source = writers[kind](tmp_path / "src", good_samples())
    report = prepare([str(source)], tmp_path / "out", OPTIONS)
    assert report["source"]["kind"] == kind and report["kept"] == 10 and report["skipped"] == 0
    expected = sorted(comparable(r) for r in rows(good / "reference"))
    assert sorted(comparable(r) for r in rows(tmp_path / "out")) == expected


def test_parquet_file_list_and_resume_inside_a_file(good, tmp_path):
    samples = good_samples()
    files = [str(write_parquet(tmp_path / f"part{k}.parquet", samples[k * 5:(k + 1) * 5])) for k in range(2)]
    prepare(files, tmp_path / "out", OPTIONS)
    expected = sorted(comparable(r) for r in rows(good / "reference"))
    assert sorted(comparable(r) for r in rows(tmp_path / "out")) == expected
    truncate_progress(tmp_path / "out", keep=1)  # 3 rows consumed: resume starts inside part0's row group 1
    prepare(files, tmp_path / "out", OPTIONS)
    assert sorted(comparable(r) for r in rows(tmp_path / "out")) == expected


def truncate_progress(out: Path, keep: int) -> None:
    """Simulate a run killed after `keep` shards: later shards gone, progress cut back, stray lines and a tmp file."""
    progress = json.loads((out / "progress.json").read_text())
    for entry in progress["shards"][keep:]:
        (out / "shards" / entry["name"]).unlink()
    progress["shards"], progress["finished"] = progress["shards"][:keep], None
    (out / "progress.json").write_text(json.dumps(progress))
    with open(out / "skipped.jsonl", "a") as f:
        f.write('{"key": "written after the last shard", "path": "", "reason": "corrupt", "detail": ""}\n')
    (out / "shards" / "shard-00099.parquet.tmp").write_bytes(b"half a shard")
    (out / "report.json").unlink()


@pytest.fixture(scope="module")
def acceptance(tmp_path_factory):
    """The acceptance source and one uninterrupted run over it (16 kept in shards of 3)."""
    root = tmp_path_factory.mktemp("resume")
    source = str(write_acceptance_source(root / "src"))
    report = prepare([source], root / "clean", OPTIONS)
    return source, root / "clean", report


@pytest.mark.parametrize("keep", [0, 1, 4])
def test_resume_after_deleted_shards_equals_clean_run(acceptance, tmp_path, keep):
    source, clean, report = acceptance
    out = tmp_path / "out"
    prepare([source], out, OPTIONS)
    truncate_progress(out, keep)
    assert prepare([source], out, OPTIONS) == report
    assert rows(out) == rows(clean)
    assert (out / "skipped.jsonl").read_text() == (clean / "skipped.jsonl").read_text()
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(p.name for p in (clean / "shards").iterdir())


def test_resume_after_interrupt_mid_shard(acceptance, tmp_path, monkeypatch):
    """Ctrl-C while a shard is half written: the re-run drops it and still skips the later duplicate."""
    source, clean, report = acceptance
    original, seen = prepare_module.Consumer.take, []

    def take(self, output):
        if len(seen) == 20:
            raise KeyboardInterrupt
        seen.append(1)
        original(self, output)

    monkeypatch.setattr(prepare_module.Consumer, "take", take)
    with pytest.raises(KeyboardInterrupt):
        prepare([source], tmp_path / "out", OPTIONS)
    assert not list((tmp_path / "out" / "shards").glob("*.tmp"))
    done = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert done["finished"] is None and 0 < len(done["shards"]) < 6
    monkeypatch.setattr(prepare_module.Consumer, "take", original)
    assert prepare([source], tmp_path / "out", OPTIONS)["skipped_by_reason"] == report["skipped_by_reason"]
    assert rows(tmp_path / "out") == rows(clean)
    keys = [r["key"] for r in rows(tmp_path / "out")]
    assert len(keys) == len(set(keys)) == 16


def test_two_workers_write_the_same_shards(acceptance, tmp_path):
    source, clean, _ = acceptance
    prepare([source], tmp_path / "out", OPTIONS, workers=2)
    assert rows(tmp_path / "out") == rows(clean)
    assert (tmp_path / "out" / "skipped.jsonl").read_text() == (clean / "skipped.jsonl").read_text()


def test_a_worker_killed_by_an_input_skips_that_input_only(tmp_path):
    from datasets_prep.parallel import results
    from datasets_prep.process import ProcessConfig, Skipped
    from datasets_prep.sources import CaptionFolder
    from prep_images import crash_on_marker

    samples = good_samples()
    samples[6] = ("crash.jpg",) + samples[6][1:]
    source = CaptionFolder(write_caption_folder(tmp_path / "src", samples))
    config = ProcessConfig(buckets=((256, 256),))
    with results(source.items(), config, workers=2, fn=crash_on_marker) as outputs:
        got = list(outputs)
    assert [o.key if isinstance(o, Skipped) else o["key"] for o in got] == [i.key for i in source.items()]
    crashed = [o for o in got if isinstance(o, Skipped)]
    assert [(o.key, o.reason) for o in crashed] == [("crash.jpg", "worker_crashed")]


def test_finished_output_with_other_parameters_is_refused(acceptance, tmp_path):
    source, clean, report = acceptance
    out = tmp_path / "out"
    prepare([source], out, OPTIONS)
    assert prepare([source], out, OPTIONS)["kept"] == 16  # same parameters: nothing to do, same report
    with pytest.raises(UserError, match="resolution: 256 -> 512.*--overwrite"):
        prepare([source], out, PrepareOptions(resolution=512, max_pixels=200_000, shard_rows=3, group_rows=2))
    other = PrepareOptions(resolution=512, max_pixels=200_000, shard_rows=100)
    assert prepare([source], out, other, overwrite=True)["kept"] == 16
    assert len(rows(out)) == 16 and len(list((out / "shards").iterdir())) == 1


def test_non_empty_foreign_folder_is_refused(acceptance, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        prepare([acceptance[0]], tmp_path, OPTIONS)
    with pytest.raises(UserError, match="inside --source"):
        prepare([acceptance[0]], Path(acceptance[0]) / "out", OPTIONS)


def test_changed_source_is_not_resumed_blindly(tmp_path):
    source = write_caption_folder(tmp_path / "src", good_samples())
    prepare([str(source)], tmp_path / "out", OPTIONS)
    truncate_progress(tmp_path / "out", keep=1)
    (source / "good_01.jpg").rename(source / "later.jpg")  # sorts last: every later input moves up by one
    (source / "good_01.txt").rename(source / "later.txt")
    with pytest.raises(UserError, match="source changed"):
        prepare([str(source)], tmp_path / "out", OPTIONS)


def test_caption_policy_empty_keeps_uncaptioned(tmp_path):
    samples = [(n, d, None if k % 2 else c) for k, (n, d, c) in enumerate(good_samples())]
    source = write_caption_folder(tmp_path / "src", samples)
    (source / "good_00.txt").write_text("  \n")
    skip = prepare([str(source)], tmp_path / "skip", OPTIONS)
    assert skip["kept"] == 4 and skip["skipped_by_reason"] == {"empty_caption": 1, "no_caption": 5}
    empty = prepare([str(source)], tmp_path / "empty", PrepareOptions(resolution=256, caption_policy="empty"))
    assert empty["kept"] == 10 and empty["captions"]["empty"] == 6


def test_imagefolder_bad_lines_and_conditioning(tmp_path):
    samples = good_samples()[:3]
    root = write_imagefolder(tmp_path / "src", samples)
    lines = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    lines[0]["conditioning_image"] = f"images/{samples[1][0]}"
    lines += ["{not json", {"file_name": "images/gone.jpg", "text": "x"}]
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (root / "metadata.jsonl").write_text(text + "\n")
    report = prepare([str(root)], tmp_path / "out", OPTIONS)
    assert report["kept"] == 3 and report["skipped_by_reason"] == {"bad_metadata": 1, "missing_file": 1}
    first = rows(tmp_path / "out")[0]
    conditioning = Image.open(io.BytesIO(first["conditioning_image"]))
    assert conditioning.format == "PNG" and conditioning.size == (first["width"], first["height"])
    assert rows(tmp_path / "out")[1]["conditioning_image"] is None


def test_imagefolder_csv_with_commas_and_a_latin1_caption(tmp_path):
    samples = good_samples()[:3]
    root = write_imagefolder(tmp_path / "src", samples)
    (root / "metadata.jsonl").unlink()
    lines = [b"file_name,text", b'images/good_00.jpg,"a, b and c"', b"images/good_01.jpg,caf\xe9",
             f"images/{samples[2][0]},plain".encode()]
    (root / "metadata.csv").write_bytes(b"\n".join(lines) + b"\n")
    report = prepare([str(root)], tmp_path / "out", OPTIONS)
    assert report["source"]["metadata"] == "metadata.csv"
    assert report["kept"] == 2 and report["skipped_by_reason"] == {"caption_not_utf8": 1}
    assert [r["caption"] for r in rows(tmp_path / "out")] == ["a, b and c", "plain"]


def test_tar_members_are_never_extracted_and_unsafe_names_are_reported(tmp_path):
    name, data, caption = good_samples()[0]
    shards = tmp_path / "tars"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        add_member(tar, "../escape.jpg", data)
        add_member(tar, "/abs/path.jpg", data)
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        add_member(tar, "ok.jpg", data)
        add_member(tar, "ok.txt", caption.encode())
        add_member(tar, "lonely.txt", b"caption without image")
    report = prepare([str(shards)], tmp_path / "out", OPTIONS)
    assert report["kept"] == 1 and report["skipped_by_reason"] == {"no_image": 1, "unsafe_member": 3}
    assert not (tmp_path / "escape.jpg").exists() and not (shards / "escape.jpg").exists()
    assert sorted(p.name for p in shards.iterdir()) == ["00000.tar"]


def test_cli_prepare_and_inspect(tmp_path):
    source = write_caption_folder(tmp_path / "src", good_samples()[:4])
    done = cli("prepare", "--source", str(source), "--out", str(tmp_path / "out"), "--resolution", "256",
               "--buckets", "square", "--workers", "1", "--image-format", "png")
    assert done.returncode == 0, done.stderr
    assert "kept 4 of 4" in done.stdout
    shown = cli("inspect", str(tmp_path / "out"))
    assert shown.returncode == 0 and "Kept **4** of 4 inputs" in shown.stdout and "256 x 256" in shown.stdout
    assert Image.open(io.BytesIO(rows(tmp_path / "out")[0]["image"])).format == "PNG"


@pytest.mark.parametrize("make", ["missing", "empty", "unfinished"])
def test_cli_inspect_bad_dir_exits_2(tmp_path, make):
    target = tmp_path / "dir"
    if make != "missing":
        target.mkdir()
    if make == "unfinished":
        (target / "progress.json").write_text(json.dumps({"params": {}, "shards": [], "finished": None}))
    done = cli("inspect", str(target))
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("content", ["nothing", "json"])
def test_cli_unknown_source_exits_2(tmp_path, content):
    (tmp_path / "src").mkdir()
    if content == "json":
        (tmp_path / "src" / "data.json").write_text("{}")
    done = cli("prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "not a source prepare knows" in done.stderr and "Traceback" not in done.stderr
    missing = cli("prepare", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr


def test_missing_caption_column_names_the_flag(tmp_path):
    source = write_parquet(tmp_path / "a.parquet", good_samples()[:2])
    done = cli("prepare", "--source", str(source), "--out", str(tmp_path / "out"), "--caption-column", "caption")
    assert done.returncode == 2 and "--caption-column: 'caption'" in done.stderr
