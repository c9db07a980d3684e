"""The GPU suite (#27) runs every case on a CPU with tiny models and writes its table files, so the one GPU call it
is prepared for has been run end to end before a GPU is lent."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_runs_every_case_and_writes_the_tables(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.gpu_suite import cases

    out = tmp_path / "out"
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "--out", str(out), "--workdir",
                           str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                                            "DIFFTUNE_WHEELS": str(tmp_path / "none")})  # this venv, not GPU wheels
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_suite.json").read_text())
    statuses = {c["case"]: c["status"] for c in result["cases"]}
    assert list(statuses) == [c.name for c in cases()]
    log = (out / "gpu_suite.log").read_text()
    assert all(status == "ok" for status in statuses.values()), (statuses, log[-3000:])
    rows = result["rows"]
    configs = {(r["arch"], r["objective"], r["batch"], r["config"]) for r in rows if "config" in r}
    assert {("sd15", "lora", 8, "plain"), ("sd15", "lora", 8, "cudagraphs"), ("sd15", "lora", 16, "plain"),
            ("sd15", "lora", 1, "plain"), ("sdxl", "lora", 1, "checkpointing"), ("sdxl", "lora", 1, "checkpointing+nf4"),
            ("sd15", "controlnet", 4, "checkpointing+adamw8bit"), ("sd15", "lora", 8, "sdpa"),
            ("sd15", "lora", 8, "xformers"), ("sd15", "lora", 8, "adamw8bit"), ("sd15", "lora", 8, "compile")} <= configs
    plain = next(r for r in rows if r.get("config") == "plain" and r["batch"] == 8)
    assert plain["step_ms"] > 0 and float(plain["engine_over_bare"]) > 0  # the bare step ran beside the engine's
    xformers = next(r for r in rows if r.get("config") == "xformers")
    assert "refused" in xformers or xformers["step_ms"] > 0  # refused by name where it does not import
    assert {r["objective"] for r in rows if "steps_per_s" in r} == {"finetune", "consistency", "progressive", "dmd2",
                                                                    "dmd2_full"}
    table = (out / "gpu_suite.md").read_text()
    assert table.count("| ok |") == len(statuses) and re.search(r"\| dmd2_full \| 64 \| 2 \| [\d.]+ \|", table)


def test_a_spent_budget_skips_the_remaining_cases_instead_of_starting_them(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--dry-run", "--out", str(out), "--workdir",
                           str(tmp_path / "work"), "--budget", "5"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    statuses = [c["status"] for c in json.loads((out / "gpu_suite.json").read_text())["cases"]]
    assert statuses and all(s == "skipped: the suite's budget is spent" for s in statuses)


def test_the_wheels_script_pins_what_the_lock_pins():
    script = (ROOT / "bench" / "gpu_wheels.sh").read_text()
    packages = re.search(r"PACKAGES=\(([^)]*)\)", script).group(1).split()
    lock = (ROOT / "constraints.txt").read_text().lower()
    assert "diffusers" in packages and "torch" not in packages
    assert all(re.search(rf"^{p}==", lock, re.M) for p in packages)
    assert "/bench/.wheels/" in (ROOT / ".gitignore").read_text()
