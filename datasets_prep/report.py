"""report.json and report.md, computed from the shards and skipped.jsonl, so a resumed run reports like a clean one."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from datasets_prep.progress import Progress
from datasets_prep.shards import write_atomically
from trainers.errors import UserError

STAT_COLUMNS = ["caption", "bucket", "width", "height", "original_width", "original_height"]


def kept_stats(out: Path, progress: Progress, n_buckets: int) -> dict:
    """Caption word counts, bucket histogram and upscale count, one shard at a time to keep memory flat."""
    words: list[int] = []
    histogram, upscaled = [0] * n_buckets, 0
    for entry in progress.shards:
        table = pq.read_table(out / "shards" / entry["name"], columns=STAT_COLUMNS).to_pydict()
        words += [len(c.split()) for c in table["caption"]]
        for b in table["bucket"]:
            histogram[b] += 1
        sizes = zip(table["width"], table["height"], table["original_width"], table["original_height"])
        upscaled += sum(max(w / ow, h / oh) > 1 for w, h, ow, oh in sizes)
    captions = {"min_words": min(words, default=0), "max_words": max(words, default=0),
                "mean_words": round(sum(words) / len(words), 2) if words else 0.0,
                "empty": sum(n == 0 for n in words)}
    return {"kept": len(words), "captions": captions, "histogram": histogram, "upscaled": upscaled}


def skip_counts(path: Path) -> Counter:
    """Skips by reason, from skipped.jsonl."""
    if not path.exists():
        return Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        return Counter(json.loads(line)["reason"] for line in f if line.strip())


def build_report(out: Path, progress: Progress, source: dict, buckets: list[tuple[int, int]]) -> dict:
    """Everything a person or a script needs to judge the prepared data, as plain JSON."""
    stats = kept_stats(out, progress, len(buckets))
    skipped = skip_counts(out / "skipped.jsonl")
    histogram = [{"index": i, "width": w, "height": h, "count": n}
                 for i, ((w, h), n) in enumerate(zip(buckets, stats["histogram"]))]
    return {
        "inputs": stats["kept"] + sum(skipped.values()), "kept": stats["kept"], "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())), "duplicates": skipped.get("duplicate", 0),
        "captions": stats["captions"], "upscaled": stats["upscaled"], "buckets": histogram,
        "shards": len(progress.shards), "source": source, "parameters": progress.params,
    }


def render_markdown(report: dict, out: Path) -> str:
    """A page to read in a terminal: counts first, then captions, buckets and the parameters."""
    source = report["source"]
    lines = [f"# Prepared dataset: {out}", "",
             f"Source: {source['kind']} `{', '.join(source['paths'])}`  ",
             f"Kept **{report['kept']}** of {report['inputs']} inputs in {report['shards']} shard(s); "
             f"skipped {report['skipped']} (one line each in skipped.jsonl).", ""]
    if report["skipped_by_reason"]:
        lines += ["| skipped because | inputs |", "|---|---:|"]
        lines += [f"| {reason} | {n} |" for reason, n in report["skipped_by_reason"].items()] + [""]
    c = report["captions"]
    lines += [f"Captions: {c['min_words']} to {c['max_words']} words, mean {c['mean_words']}; {c['empty']} empty.  ",
              f"Upscaled to reach their bucket: {report['upscaled']}.", "",
              "| bucket | width x height | images |", "|---:|---|---:|"]
    used = [b for b in report["buckets"] if b["count"]]
    lines += [f"| {b['index']} | {b['width']} x {b['height']} | {b['count']} |" for b in used]
    lines += ["", "Parameters: " + ", ".join(f"{k}={v}" for k, v in report["parameters"].items() if k != "source"), ""]
    return "\n".join(lines)


def write_report(out: Path, progress: Progress, source: dict, buckets: list[tuple[int, int]]) -> dict:
    """Write report.json and report.md last: their presence marks a finished dataset for `inspect`."""
    report = build_report(out, progress, source, buckets)
    write_atomically(out / "report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    write_atomically(out / "report.md", render_markdown(report, out))
    return report


def summary_text(out: Path) -> str:
    """report.md of a finished dataset, or a UserError saying why `out` is not one."""
    if not out.is_dir():
        raise UserError(f"{out}: no such folder")
    progress = Progress.load(out)
    if progress is None:
        raise UserError(f"{out} is not a prepared dataset (no progress.json); "
                        "run `python -m datasets_prep prepare --source SRC --out DIR` first")
    if progress.finished is None or not (out / "report.md").is_file():
        raise UserError(f"{out} is an unfinished prepare; re-run the same prepare command to complete it")
    return (out / "report.md").read_text(encoding="utf-8")
