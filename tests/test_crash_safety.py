"""A run killed with SIGKILL at random moments, checkpoint writes included, resumes and finishes every time."""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from trainers import checkpoint

ROOT = Path(__file__).resolve().parents[1]
KILLS = 20


def test_sigkill_at_20_random_moments_then_resume_finishes(tiny_sd15, digits_data, tmp_path):
    out, rng = tmp_path / "run", random.Random(0)
    args = [sys.executable, "launch/train.py", "recipes/demo/sd15_lora_tiny.yaml", f"model.pretrained={tiny_sd15}",
            f"data.source={digits_data}", f"output_dir={out}", "train.max_steps=300", "checkpoint.every_steps=1",
            "checkpoint.keep_last=2", "train.log_every=1", "train.report_to=none", "validation.every_steps=0",
            "data.num_workers=0", "train.batch_size=2", "lr_schedule.name=constant"]
    metrics, seen_tmp, resumed_from = out / "logs" / "metrics.jsonl", 0, []
    for _ in range(KILLS):
        before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        # wait for a new step (and, the first time, for the first checkpoint: until one is written there is
        # nothing a kill could lose), then a random moment
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) > before and checkpoint.complete_checkpoints(out):
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen_tmp += any((out / "checkpoints").glob(".tmp-*"))  # killed inside a checkpoint write
        complete = checkpoint.complete_checkpoints(out)
        assert complete, "a complete checkpoint must survive every kill"
        for ckpt in complete:  # every folder that claims to be complete really is
            load_file(ckpt / "weights.safetensors")
            json.loads((ckpt / "state.json").read_text())
        resumed_from.append(int(complete[-1].name[5:]))
    finish = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert resumed_from == sorted(resumed_from) and resumed_from[-1] < 300  # still mid-run at the last kill
    assert seen_tmp >= 1, "no kill landed inside a checkpoint write; raise KILLS or the write share"
