"""Throughput of `python -m datasets_prep prepare` on generated JPEGs, with 1 and 2 workers.

    python bench/prepare_throughput.py --n 20000 --out /tmp/bench_prep    # the figures in bench/README.md
    python bench/prepare_throughput.py --n 500 --out /tmp/bench_prep      # smoke check, under a minute

The source (OUT/source-N: JPEGs of 512..1024 px on the long side, quality 90, with .txt captions) is generated
once and reused by later runs. Each prepare runs in a subprocess while this process polls /proc for the child
tree, so peak RSS is per process (VmHWM of the main process and of the largest worker) and the load average of
the (shared) machine is recorded beside the figures. CPU time is getrusage(RUSAGE_CHILDREN), which counts every
process of the tree once it has been waited for.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
GENERATOR = 1  # bump when the generated images change, so an old source folder is regenerated
RATIOS = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)  # long side / short side; half of the images are portrait
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
           "black": (20, 20, 20), "white": (240, 240, 240), "purple": (130, 50, 160), "orange": (240, 130, 30)}
SHAPES = ("ellipse", "rectangle", "triangle")
GRAIN = np.random.default_rng(0).integers(-12, 13, (1024, 1024, 3), dtype=np.int16)  # cut per image, not redrawn


def picture(i: int, seed: int) -> tuple[Image.Image, str]:
    """Image i and its caption: a smooth colour field (upsampled noise), sensor-like grain and a few shapes."""
    rng = np.random.default_rng([seed, i])
    long = int(rng.integers(512, 1025))
    short = int(long / RATIOS[rng.integers(len(RATIOS))])
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    cells = rng.integers(0, 256, (int(rng.integers(3, 12)), int(rng.integers(3, 12)), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(cells, "RGB").resize((width, height), Image.Resampling.BICUBIC), np.int16)
    top, left = rng.integers(0, 1024 - height + 1), rng.integers(0, 1024 - width + 1)
    pixels = np.clip(field + GRAIN[top:top + height, left:left + width], 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw, words = ImageDraw.Draw(image), []
    for _ in range(int(rng.integers(2, 6))):
        name, shape = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
        x0, y0 = int(rng.integers(0, width - 64)), int(rng.integers(0, height - 64))
        x1, y1 = x0 + int(rng.integers(32, width // 2)), y0 + int(rng.integers(32, height // 2))
        if shape == "triangle":
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=COLOURS[name])
        else:
            getattr(draw, shape)([x0, y0, x1, y1], fill=COLOURS[name])
        words.append(f"a {name} {shape}")
    return image, f"{', '.join(words)} on a blurry background, picture {i}"


def write_pictures(job: tuple[Path, int, int, int]) -> None:
    """Pool task: images start..stop-1 as JPEG quality 90 with a .txt caption, 1000 per subfolder."""
    folder, seed, start, stop = job
    for i in range(start, stop):
        image, caption = picture(i, seed)
        path = folder / f"{i // 1000:03d}" / f"img_{i:06d}.jpg"
        path.parent.mkdir(exist_ok=True)
        image.save(path, quality=90)
        path.with_suffix(".txt").write_text(caption)


def ensure_source(out: Path, n: int, seed: int) -> Path:
    """OUT/source-N, generated on two processes unless a complete one from the same generator is there."""
    folder, marker = out / f"source-{n}", {"n": n, "seed": seed, "generator": GENERATOR}
    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text()) == marker:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    jobs = [(folder, seed, k, min(k + 250, n)) for k in range(0, n, 250)]
    with get_context("spawn").Pool(2) as pool:
        pool.map(write_pictures, jobs, chunksize=1)
    done.write_text(json.dumps(marker))  # last, so an interrupted generation is redone
    size = sum(p.stat().st_size for p in folder.rglob("*.jpg"))
    print(f"generated {n} images ({size / n / 1024:.0f} KiB mean) in {time.perf_counter() - started:.0f} s")
    return folder


def tree(root: int) -> dict[int, str]:
    """pid -> command line of root and all its descendants, from /proc."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # ended while we looked
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        frontier += [child for child, parent in parents.items() if parent == pid]
    return found


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process has had (it only grows, so the last reading counts)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Watcher(threading.Thread):
    """Polls the child tree's peak RSS every 0.2 s and the 1-minute load average every second."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peaks: dict[int, int] = {}
        self.kinds: dict[int, str] = {}
        self.load: list[float] = []

    def run(self) -> None:
        last_load = 0.0
        while not self.stop.is_set():
            for pid, cmdline in tree(self.pid).items():
                self.kinds[pid] = ("main" if pid == self.pid else "helper" if "resource_tracker" in cmdline
                                   else "worker" if "spawn_main" in cmdline else "other")
                self.peaks[pid] = max(self.peaks.get(pid, 0), peak_rss_kib(pid))
            if time.monotonic() - last_load >= 1:
                self.load.append(float(Path("/proc/loadavg").read_text().split()[0]))
                last_load = time.monotonic()
            self.stop.wait(0.2)

    def peak(self, kind: str) -> int:
        return max((v for pid, v in self.peaks.items() if self.kinds[pid] == kind), default=0)


def time_prepare(source: Path, out: Path, workers: int, args: argparse.Namespace) -> dict:
    """One prepare run from scratch in a subprocess: wall and CPU time, peak RSS per process, load average."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "datasets_prep", "prepare", "--source", str(source), "--out", str(out),
               "--resolution", str(args.resolution), "--buckets", args.buckets, "--workers", str(workers)]
    command += ["--conditioning", args.conditioning] if args.conditioning else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = float(Path("/proc/loadavg").read_text().split()[0])
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = Watcher(child.pid)
    watcher.start()
    log = child.communicate()[0]
    wall = time.perf_counter() - started
    watcher.stop.set()
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode:
        raise SystemExit(f"prepare failed ({child.returncode}):\n{log}")
    report = json.loads((out / "report.json").read_text())
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"workers": workers, "inputs": report["inputs"], "kept": report["kept"], "wall_s": wall,
            "images_per_s": report["inputs"] / wall, "cpu_s": cpu, "peak_rss_main_mib": watcher.peak("main") / 1024,
            "peak_rss_worker_mib": watcher.peak("worker") / 1024, "load_before": load_before,
            "load_mean": float(np.mean(watcher.load)) if watcher.load else load_before,
            "load_max": max(watcher.load, default=load_before)}


def table(rows: list[dict]) -> str:
    lines = ["| workers | inputs | kept | wall s | images/s | CPU s (user+sys) | CPU/wall | peak RSS main MiB | "
             "peak RSS largest worker MiB | load 1-min before / mean / max |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        worker = f"{r['peak_rss_worker_mib']:.0f}" if r["workers"] > 1 else "(in main)"
        lines.append(f"| {r['workers']} | {r['inputs']} | {r['kept']} | {r['wall_s']:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['cpu_s']:.1f} | {r['cpu_s'] / r['wall_s']:.2f} | {r['peak_rss_main_mib']:.0f} | {worker} | "
                     f"{r['load_before']:.2f} / {r['load_mean']:.2f} / {r['load_max']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="number of generated images")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_prep"), help="sources, outputs and results")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time, in order")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--buckets", default="sdxl")
    parser.add_argument("--conditioning", choices=("canny",), default=None, help="also derive Canny edge maps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    args = parser.parse_args()
    source = ensure_source(args.out, args.n, args.seed)
    rows = []
    for workers in args.workers:
        rows.append(time_prepare(source, args.out / f"prepared-w{workers}", workers, args))
        print(f"workers {workers}: {rows[-1]['images_per_s']:.1f} images/s", flush=True)
    suffix = f"-{args.conditioning}" if args.conditioning else ""
    (args.out / f"results-{args.n}{suffix}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
