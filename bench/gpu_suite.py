"""One prepared GPU call (#27): every performance claim of the project measured on a bare GPU machine, in order of
importance, each case its own process with its own time budget, the table rewritten after every case so that a run
cut off still returns what it measured.

    bash bench/gpu_wheels.sh                       # here, once: the wheels a GPU machine lacks (bench/.wheels)
    bash bench/gpu_suite.sh --out "$OUT"           # there: installs them offline, builds full-size models, measures
    bash bench/gpu_suite.sh --dry-run --out DIR    # on a CPU: every case with tiny models, in a few minutes

Cases run bench/throughput.py (the engine's step against a bare hand-written step, images/s, peak memory, MFU) and
bench/lcm_step_cost.py (distillation steps against a plain LoRA step), with random-initialised full-size models
from launch/make_tiny_model.py. A case that outlives its budget is killed and marked so; once the suite's budget
is spent, the remaining cases are marked skipped, never started. Writes gpu_suite.md, gpu_suite.json and
gpu_suite.log to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT, STEP_COST = "bench/throughput.py", "bench/lcm_step_cost.py"
# dense bf16 peak by device name, for MFU (H100 and H200 SXM: 989 TFLOP/s)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


@dataclass
class Case:
    """One measurement: a script and its arguments on the GPU (full) and in the CPU dry run (tiny)."""
    name: str
    script: str
    full: list[str]
    dry: list[str]
    budget_s: int           # on the GPU; the dry run gives each case DRY_BUDGET_S
    kind: str = "throughput"  # throughput | step_cost | prepare


DRY_BUDGET_S = 90
COMMON_FULL = ["--size", "full", "--precision", "bf16", "--rank", "4", "--workers", "4"]
COMMON_DRY = ["--size", "tiny", "--precision", "no", "--rank", "4", "--workers", "0", "--steps", "3",
              "--warmup", "1", "--compile-backend", "eager"]


EAGER = ["--steps", "30", "--warmup", "10"]
GRAPHS = ["--steps", "40", "--warmup", "20"]  # compiles and graph captures happen in the warm-up


def step_case(name: str, arch: str, batch: int, configs: list[str], budget_s: int, bare: bool = False,
              timing: list[str] = EAGER, objective: str = "lora") -> Case:
    """A bench/throughput.py case: the same model, batch and configurations on the GPU and in the dry run."""
    shared = ["--arch", arch, "--objective", objective, "--batch", str(batch), *([] if bare else ["--no-bare"]),
              "--configs", *configs]
    return Case(name, THROUGHPUT, [*COMMON_FULL, *timing, *shared], [*COMMON_DRY, *shared], budget_s)


def prepare_case(arch: str, budget_s: int) -> Case:
    return Case(f"prepare {arch}", "bench/gpu_suite.py", ["--prepare", arch, "--size", "full"],
                ["--prepare", arch, "--size", "tiny"], budget_s, kind="prepare")


def cases() -> list[Case]:
    """Most important first: the SD-1.5 LoRA claims (>= 3x the diffusers example, >= 0.9x a bare CUDA-graph step),
    then SDXL memory, ControlNet, the distillation step costs, attention and optimizer variants."""
    distilled = ["--objectives", "finetune", "consistency", "progressive", "dmd2", "dmd2_full"]
    return [
        prepare_case("sd15", 120),
        step_case("sd15 LoRA b8 eager + bare step", "sd15", 8, ["plain"], 120, bare=True),
        step_case("sd15 LoRA b8 CUDA graphs", "sd15", 8, ["cudagraphs"], 180, timing=GRAPHS),
        step_case("sd15 LoRA b16 eager", "sd15", 16, ["plain"], 60),
        step_case("sd15 LoRA b1 eager", "sd15", 1, ["plain"], 50),
        prepare_case("sdxl", 150),
        step_case("sdxl LoRA b1 1024 px checkpointing", "sdxl", 1, ["checkpointing", "checkpointing+nf4"], 150,
                  bare=True),
        step_case("sd15 ControlNet b4 8-bit AdamW + checkpointing", "sd15", 4, ["checkpointing+adamw8bit"], 90,
                  objective="controlnet"),
        Case("distillation step cost, sd15 512 px b4", STEP_COST,
             ["--batch", "4", "--resolution", "512", "--precision", "bf16", "--steps", "20", "--interval", "5",
              "--workers", "4", *distilled],
             ["--batch", "2", "--resolution", "64", "--precision", "no", "--steps", "5", "--interval", "1",
              *distilled], 150, kind="step_cost"),
        step_case("sd15 LoRA b8 xformers against SDPA", "sd15", 8, ["sdpa", "xformers"], 90),
        step_case("sd15 LoRA b8 8-bit AdamW", "sd15", 8, ["adamw8bit"], 60),
        step_case("sd15 LoRA b8 compiled", "sd15", 8, ["compile"], 150, timing=GRAPHS),
    ]


def prepare(arch: str, size: str, workdir: Path) -> None:
    """Build the model folder and the data bench/throughput.py and lcm_step_cost.py read, once."""
    sys.path.insert(0, str(ROOT))
    from bench.throughput import RESOLUTION, prepare as prepare_throughput

    resolution = RESOLUTION[(arch, size)]
    for objective in ("lora", "controlnet") if arch == "sd15" else ("lora",):
        prepare_throughput(argparse.Namespace(workdir=workdir, arch=arch, size=size, objective=objective,
                                              batch=16, resolution=resolution))
    print(f"prepared {arch} {size} in {workdir}")


def environment() -> dict:
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}
    for module in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "xformers", "datasets", "pyarrow"):
        try:
            env[module] = __import__(module).__version__
        except Exception as e:  # noqa: BLE001 - a missing or broken package is a fact to record, not a failure
            env[module] = f"absent ({type(e).__name__})"
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["driver"] = None
    env["peak_tflops"] = next((v for k, v in PEAK_TFLOPS.items() if k in env["device"]), None)
    return env


def run_case(case: Case, args, rows_file: Path, log, budget: float) -> dict:
    argv = case.dry if args.dry_run else case.full
    if case.kind == "prepare":
        argv = [*argv, "--workdir", str(args.workdir)]
    elif case.kind == "throughput":
        argv = [*argv, "--workdir", str(args.workdir), "--json", str(rows_file)]
        if args.peak_tflops:
            argv += ["--peak-tflops", str(args.peak_tflops)]
    else:
        size, resolution = ("tiny", 64) if args.dry_run else ("full", 512)  # what "prepare sd15" wrote
        argv = [*argv, "--model", str(args.workdir / f"sd15-{size}"), "--data",
                str(args.workdir / f"digits-{resolution}"), "--json", str(rows_file)]
    log.write(f"\n===== {case.name}: {case.script} {' '.join(argv)} (budget {budget:.0f} s)\n")
    log.flush()
    began = time.monotonic()
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([sys.executable, case.script, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              timeout=budget, env=env)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {budget:.0f} s"
    return {"case": case.name, "status": status, "seconds": round(time.monotonic() - began, 1)}


def render(env: dict, statuses: list[dict], rows: list[dict]) -> str:
    lines = [f"GPU suite, {env['date']}: {env['device']}, torch {env['torch']} (CUDA {env['cuda']}), driver "
             f"{env['driver']}, diffusers {env['diffusers']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"accelerate {env['accelerate']}, bitsandbytes {env['bitsandbytes']}, xformers {env['xformers']}; MFU "
             f"against {env['peak_tflops'] or '-'} TFLOP/s.", "",
             "| case | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s['case']} | {s['status']} | {s['seconds']} |" for s in statuses]
    steps = [r for r in rows if "config" in r]
    if steps:
        lines += ["", "| model | objective | px | batch | configuration | step ms | images/s | peak GiB | MFU | bare ms "
                  "| bare peak GiB | engine / bare |", "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in steps:
            if "refused" in r:
                lines.append(f"| {r['arch']} {r['size']} | {r['objective']} | {r['resolution']} | {r['batch']} | "
                             f"{r['config']} | refused: {r['refused']} | | | | | | |")
                continue
            lines.append(f"| {r['arch']} {r['size']} | {r['objective']} | {r['resolution']} | {r['batch']} | "
                         f"{r['config']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | {r['peak_gib']} | {r['mfu']} "
                         f"| {r['bare_ms']} | {r['bare_peak_gib']} | {r['engine_over_bare']} |")
    costs = [r for r in rows if "objective" in r and "steps_per_s" in r]
    if costs:
        lines += ["", "| distillation objective | px | batch | steps/s | step time / plain LoRA step | peak GiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['objective']} | {r['resolution']} | {r['batch']} | {r['steps_per_s']:.3f} | "
                  f"{r['relative']:.2f}x | {r['peak_gib']} |" for r in costs]
    return "\n".join(lines) + "\n"


def write(out: Path, env: dict, statuses: list[dict], rows_file: Path) -> None:
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    (out / "gpu_suite.json").write_text(json.dumps({"environment": env, "cases": statuses, "rows": rows}, indent=1))
    (out / "gpu_suite.md").write_text(render(env, statuses, rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models on whatever device there is")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_suite_out"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/difftune_gpu_suite"))
    parser.add_argument("--budget", type=float, default=510.0, help="seconds for the whole suite (9 min less start-up)")
    parser.add_argument("--only", nargs="+", default=None, help="case names (or a prefix) to run, in suite order")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: by device name")
    parser.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.size, args.workdir)
        return 0
    began = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows_file = args.workdir / "rows.jsonl"
    rows_file.unlink(missing_ok=True)
    env = environment()
    args.peak_tflops = args.peak_tflops or env["peak_tflops"]
    selected = [c for c in cases() if not args.only or any(c.name.startswith(o) for o in args.only)]
    statuses: list[dict] = []
    with open(args.out / "gpu_suite.log", "w") as log:
        log.write(json.dumps(env) + "\n")
        for case in selected:
            left = args.budget - (time.monotonic() - began)
            if left < 10:
                statuses.append({"case": case.name, "status": "skipped: the suite's budget is spent", "seconds": 0})
            else:
                budget = min(DRY_BUDGET_S if args.dry_run else case.budget_s, left)
                statuses.append(run_case(case, args, rows_file, log, budget))
            write(args.out, env, statuses, rows_file)
            print(f"{statuses[-1]['case']}: {statuses[-1]['status']} ({statuses[-1]['seconds']} s)", flush=True)
    print(f"suite done in {time.monotonic() - began:.0f} s; table: {args.out / 'gpu_suite.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
