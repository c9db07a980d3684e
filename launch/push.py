"""Push a run's final/ to the Hugging Face Hub in one commit: weights, model card, sample grid, recipe.

    python launch/push.py RUN_OR_FINAL_DIR --repo-id OWNER/NAME [--private] [--revision BRANCH]

The token comes from HF_TOKEN (or a saved `hf auth login`), the hub from HF_ENDPOINT. Prints the commit URL;
a missing folder, a refused token or a hub error prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from launch.cli import run_cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, metavar="RUN_OR_FINAL_DIR",
                        help="a run's output_dir (its final/ is pushed) or a final/ directory itself")
    parser.add_argument("--repo-id", required=True, metavar="OWNER/NAME")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--revision", metavar="BRANCH", help="commit to this branch, created if missing")
    return parser.parse_args(argv)


def final_dir(folder: Path) -> Path:
    """The directory holding the artefacts: RUN/final when present, else the folder itself."""
    from trainers.errors import UserError

    if not folder.is_dir():
        raise UserError(f"{folder}: no such directory")
    final = folder / "final" if (folder / "final").is_dir() else folder
    if not any(final.rglob("*.safetensors")):
        hint = " (training did not reach train.max_steps?)" if (folder / "checkpoints").is_dir() else ""
        raise UserError(f"{folder}: no final artefacts (no final/ with .safetensors weights){hint}")
    return final


def main(argv=None) -> int:
    args = parse_args(argv)
    from trainers.hub import push_folder

    print(push_folder(final_dir(args.folder), args.repo_id, private=args.private, revision=args.revision))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
