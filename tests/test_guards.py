"""trainers/guards.py: a non-finite step is skipped exactly; too many in a row stop the run."""
import json

import pytest
import torch

from trainers.engine import Trainer
from trainers.errors import UserError


def poison(trainer, bad_steps):
    """Make the objective's loss NaN on the given optimizer steps."""
    loss = trainer.objective.loss

    def patched(batch, step):
        value, logs = loss(batch, step)
        return (value * float("nan"), logs) if step in bad_steps else (value, logs)

    trainer.objective.loss = patched


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_a_nan_step_changes_nothing_and_is_counted(recipe_for, tmp_path, optimizer):
    args = ("train.log_every=1", "ema.enabled=true", f"optimizer.name={optimizer}", "lr_schedule.name=constant")
    clean = Trainer(recipe_for("train.max_steps=2", *args, out=tmp_path / "clean"))
    clean.fit()
    poisoned = Trainer(recipe_for("train.max_steps=3", *args, out=tmp_path / "poisoned"))
    poison(poisoned, {3})
    poisoned.fit()
    for k, p in clean.params.items():
        assert torch.equal(p, poisoned.params[k]), k
        assert torch.equal(clean.ema.shadow[k], poisoned.ema.shadow[k]), k
    metrics = [json.loads(x) for x in (tmp_path / "poisoned" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 1]


def test_too_many_in_a_row_stop_with_a_clear_message(recipe_for):
    trainer = Trainer(recipe_for("train.max_steps=10", "train.log_every=5", "train.max_nonfinite_steps=3"))
    poison(trainer, {2, 3, 4})
    with pytest.raises(UserError, match="diverged: 3 non-finite"):
        trainer.fit()
