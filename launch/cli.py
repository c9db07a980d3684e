"""Shared entry-point behaviour: a user error is one line on stderr and exit code 2, never a traceback; a chain
of training stages that a signal stops ends there, with its checkpoint named and exit code 0."""
from __future__ import annotations

import sys


def run_cli(main, *args) -> int:
    from trainers.errors import UserError
    from trainers.versions import check_versions

    try:
        check_versions()
        return main(*args) or 0
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except Stopped as e:
        print(e, flush=True)
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class Stopped(Exception):
    """A stage of a chain stopped on a signal after checkpointing: the later stages must not run on its absence."""


def fit_stage(recipe):
    """Train one stage of a chain (demo, demo teacher, distillation) and return its TrainResult; a stop signal
    raises Stopped with the run's last line, so the chain ends and the same command resumes it."""
    from trainers.checkpoint import step_dir
    from trainers.engine import Trainer

    result = Trainer(recipe).fit()
    if result.stopped:
        raise Stopped(f"stopped by a signal: step {result.step} of {recipe.name} checkpointed in "
                      f"{step_dir(result.output_dir, result.step)}; the same command resumes the chain")
    return result


def finish_line(result) -> str:
    """The run's last line: where its artefacts are, or, stopped early, the checkpoint a resume starts from."""
    from trainers.checkpoint import step_dir

    if result.final_dir is not None:
        return f"done: step {result.step}, final artefacts in {result.final_dir}"
    how = "stopped by a signal" if result.stopped else "stopped"
    return (f"{how}: step {result.step} checkpointed in {step_dir(result.output_dir, result.step)}; "
            "the same command resumes it (resume: auto)")


def one_line(message: str) -> str:
    """The user's message alone, also when a DataLoader worker wrapped it in a traceback."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if "Original Traceback" in message and lines:
        return lines[-1].split("Error: ", 1)[-1]
    return " ".join(line.strip() for line in lines)
