"""The distillation chain on benchmark world v2 (#24, #25): an LCM-LoRA, a full LCM, a guided progressive and a
DMD2 LoRA student of the v2 teacher, each scored at 1, 2 and 4 steps against the teacher at the same steps and at 25 on what world v2
measures: adherence to what a caption fixes, coverage of what it leaves open, Fréchet distance to renders.

    python launch/demo_distill.py --teacher assets/demo_teacher_v2 --out demo_out/distill_v2

Writes OUT/table.md (every model and step count, and the verdicts of #24's acceptance), OUT/quality_vs_steps.png
and one results folder per model under OUT/eval. Re-running resumes or reuses the students' runs.
`make demo FULL=1` runs it when the v2 teacher is committed.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from launch.cli import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEACHER_V2 = ROOT / "assets" / "demo_teacher_v2"
RECIPES = ROOT / "recipes" / "demo"
GUIDANCE = 3.0  # the teacher's guidance_scale; the students with an omega embedding take the same value
STUDENT_STEPS = (1, 2, 4)
TEACHER_STEPS = (1, 2, 4, 8, 25)
REFERENCE = 25  # the teacher's many-step reference of #24's acceptance
DATA_SEED = 2  # apart from the teacher's data (seed 0) and the evaluator's held-out prompts
IMAGES, PROMPTS, IMAGES_PER_PROMPT = 4096, 40, 8  # K = 8 images per prompt: coverage needs several


@dataclass(frozen=True)
class Student:
    """How a student is trained and sampled, and which of the teacher's samplers it is judged against."""

    recipe: Path
    lora: bool  # loaded as a LoRA on the teacher; otherwise its export replaces the teacher's U-Net
    scheduler: str | None  # None: the scheduler its export carries
    guidance: float  # 1: guidance distilled in, no CFG pass; GUIDANCE: omega = guidance - 1 embedded
    against: str  # "dpmpp" or "ddim": the teacher rows its verdict reads


STUDENTS = {
    "lcm-lora": Student(RECIPES / "lcm_lora_v2.yaml", True, "lcm", 1.0, "dpmpp"),
    "lcm": Student(RECIPES / "lcm_full_v2.yaml", False, None, GUIDANCE, "dpmpp"),
    "progressive": Student(RECIPES / "progressive_v2.yaml", False, None, GUIDANCE, "ddim"),
    "dmd2": Student(RECIPES / "dmd2_lora_v2.yaml", True, None, 1.0, "dpmpp"),
}
TEACHER_SAMPLERS = {"dpmpp": {"scheduler": "dpmpp"}, "ddim": {"scheduler": "ddim", "timestep_spacing": "trailing"}}
LABELS = {"teacher/dpmpp": "teacher, DPM-Solver++", "teacher/ddim": "teacher, DDIM", "lcm-lora": "LCM-LoRA",
          "lcm": "full LCM", "progressive": "progressive (guided)", "dmd2": "DMD2 LoRA"}


def write_data(where: Path, n: int) -> Path:
    """The images the students distil on (latents and captions are all they use), written once."""
    from datasets_prep.synth_world2 import write_world2_dataset

    summary = where / "world.json"
    if not summary.is_file() or json.loads(summary.read_text()).get("n") != n:
        write_world2_dataset(where, n=n, size=32, seed=DATA_SEED)
    return where


def train_students(teacher: Path, data: Path, runs: Path, overrides: dict[str, list[str]]) -> dict[str, Path]:
    """Each student's run folder (trained, or resumed and re-exported if it already finished)."""
    from launch.cli import fit_stage
    from trainers.config import load_recipe

    done = {}
    for name, student in STUDENTS.items():
        fit_stage(load_recipe(student.recipe, [f"model.pretrained={teacher}", f"data.source={data}",
                                               f"output_dir={runs / name}", *overrides.get(name, [])]))
        done[name] = runs / name
    return done


def student_models(name: str, run: Path, steps: list[int]) -> list[tuple[list[int], Path]]:
    """(step counts, what to load) for a student: one export for every count, except progressive's stages, each
    of which is a student for its own count."""
    if name != "progressive":
        return [(steps, run / "final")]
    from launch.export import export_stage_students

    stages = {count: export for count, _, export in export_stage_students(run)}
    return [([n], stages[n]) for n in steps if n in stages]


def evaluate_chain(teacher: Path, runs: dict[str, Path], teacher_steps: list[int], student_steps: list[int],
                   prompts: int, per_prompt: int) -> dict[str, dict]:
    """Results (launch/evaluate.py's dicts) for the teacher with both samplers and for every student."""
    from launch.evaluate import evaluate, load_pipeline

    common = dict(world="v2", prompts=prompts, images_per_prompt=per_prompt)
    pipe = load_pipeline(teacher, None, "auto")
    results = {f"teacher/{name}": evaluate(pipe, teacher_steps, guidance=GUIDANCE, **sampler, **common)
               for name, sampler in TEACHER_SAMPLERS.items()}
    for name, run in runs.items():
        student = STUDENTS[name]
        merged = None
        for counts, model in student_models(name, run, student_steps):
            source = {"lora": model} if student.lora else {"student": model}
            result = evaluate(teacher, counts, scheduler=student.scheduler, guidance=student.guidance,
                              **source, **common)
            if merged is None:
                merged = result
            else:
                merged["runs"] += result["runs"]
        results[name] = merged
    return results


def entry_values(entry: dict) -> dict[str, float]:
    return {"all": entry["adherence"]["all"], "coverage": entry["coverage"]["coverage"], "fd": entry["fd"]}


def at_steps(results: dict, steps: int) -> dict | None:
    return next((entry_values(r) for r in results["runs"] if r["steps"] == steps), None)


def verdicts(results: dict[str, dict]) -> list[str]:
    """#24's acceptance, read off the results: the 4-step LCM-LoRA within 10% of the teacher's 25-step all-factor
    adherence and coverage distance; the 2-step progressive and LCM students closing at least half of the gap
    between the teacher at 2 steps and at 25, on both. Coverage is a distance (lower is better)."""
    lines = []

    def teacher(name: str, steps: int):
        return at_steps(results[f"teacher/{STUDENTS[name].against}"], steps)

    if "lcm-lora" in results:
        mine, ref = at_steps(results["lcm-lora"], 4), teacher("lcm-lora", REFERENCE)
        if mine and ref:
            ok_all = mine["all"] >= 0.9 * ref["all"] - 1e-9  # a rate that equals the bound meets it
            ok_cov = mine["coverage"] <= ref["coverage"] + 0.1 * abs(ref["coverage"]) + 1e-9
            lines.append(f"- LCM-LoRA at 4 steps within 10% of the teacher at {REFERENCE}: all-factor "
                         f"{mine['all']:.2f} against {ref['all']:.2f} ({'met' if ok_all else 'not met'}), coverage "
                         f"{mine['coverage']:.3f} against {ref['coverage']:.3f} ({'met' if ok_cov else 'not met'})")
    if "dmd2" in results:
        lines += dmd2_verdicts(results)
    for name in ("progressive", "lcm"):
        if name not in results:
            continue
        mine, low, ref = at_steps(results[name], 2), teacher(name, 2), teacher(name, REFERENCE)
        if not (mine and low and ref):
            continue
        parts = []
        for key, better in (("all", 1), ("coverage", -1)):
            gap = (ref[key] - low[key]) * better
            closed = (mine[key] - low[key]) * better / gap if gap > 0 else float("nan")
            met = closed >= 0.5 - 1e-9 if gap > 0 else (mine[key] - ref[key]) * better >= 0
            parts.append(f"{key} {mine[key]:.3g} (teacher {low[key]:.3g} at 2, {ref[key]:.3g} at {REFERENCE}; "
                         + (f"closes {closed:.0%} of the gap" if gap > 0 else "no gap to close")
                         + f", {'met' if met else 'not met'})")
        lines.append(f"- {LABELS[name]} at 2 steps closes half the gap: " + "; ".join(parts))
    return lines


def dmd2_verdicts(results: dict[str, dict]) -> list[str]:
    """#25's acceptance: DMD2 at 1 step better than the LCM-LoRA at 1 step and the teacher at 1 and 2 steps, on
    all-factor adherence (higher) and coverage distance (lower); at 4 steps within 10% of the teacher at 25."""
    one, four = at_steps(results["dmd2"], 1), at_steps(results["dmd2"], 4)
    teacher = results[f"teacher/{STUDENTS['dmd2'].against}"]
    lines = []
    rivals = [(f"teacher at {n}", at_steps(teacher, n)) for n in (1, 2)]
    if "lcm-lora" in results:
        rivals.insert(0, ("LCM-LoRA at 1", at_steps(results["lcm-lora"], 1)))
    if one:
        parts = [f"{label}: all {one['all']:.2f} vs {other['all']:.2f}, coverage {one['coverage']:.3f} vs "
                 f"{other['coverage']:.3f} ({'met' if one['all'] > other['all'] and one['coverage'] < other['coverage'] else 'not met'})"
                 for label, other in rivals if other]
        lines.append("- DMD2 at 1 step beats " + "; ".join(parts))
    ref = at_steps(teacher, REFERENCE)
    if four and ref:
        ok_all = four["all"] >= 0.9 * ref["all"] - 1e-9
        ok_cov = four["coverage"] <= ref["coverage"] + 0.1 * abs(ref["coverage"]) + 1e-9
        lines.append(f"- DMD2 at 4 steps within 10% of the teacher at {REFERENCE}: all-factor {four['all']:.2f} against "
                     f"{ref['all']:.2f} ({'met' if ok_all else 'not met'}), coverage {four['coverage']:.3f} against "
                     f"{ref['coverage']:.3f} ({'met' if ok_cov else 'not met'})")
    return lines


def table(results: dict[str, dict]) -> list[str]:
    """One Markdown row per model and step count: cost, adherence per factor, coverage, modes, SWD, FD."""
    from launch.evaluate import WORLD2_KEYS, row

    head = ["| model | steps | calls/img | evals/img | s/img | " + " | ".join(WORLD2_KEYS)
            + " | coverage | modes | SWD | FD |", "|---" * (9 + len(WORLD2_KEYS)) + "|"]
    first = next(iter(results.values()))
    lines = head + [row("real | –", first["real"], "v2")]
    for name, result in results.items():
        lines += [row(f"{LABELS[name]} | {run['steps']}", run, "v2") for run in result["runs"]]
    return lines


def plot(results: dict[str, dict], png: Path) -> Path:
    """All-factor adherence, coverage distance and FD against sampling steps; the real renders' level dashed."""
    from launch.demo_report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=110)
    real = entry_values(next(iter(results.values()))["real"])
    panels = (("all", "all-factor adherence (higher is better)"), ("coverage", "coverage distance (lower)"),
              ("fd", "Fréchet distance (lower)"))
    ticks = sorted({r["steps"] for result in results.values() for r in result["runs"]})
    for ax, (key, title) in zip(axes, panels):
        for name, result in results.items():
            runs = sorted(result["runs"], key=lambda r: r["steps"])
            ax.plot([r["steps"] for r in runs], [entry_values(r)[key] for r in runs], marker="o",
                    linestyle="--" if name.startswith("teacher") else "-", label=LABELS[name])
        ax.axhline(real[key], color="grey", linewidth=0.8, linestyle=":", label="real renders")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("sampling steps")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def write_section(out: Path, results: dict[str, dict]) -> list[str]:
    """Results folders, table.md and the plot; returns the Markdown section the demo's report carries."""
    from launch.evaluate import write_results

    for name, result in results.items():
        write_results(result, out / "eval" / name.replace("/", "-"))
    png = plot(results, out / "quality_vs_steps.png")
    first = next(iter(results.values()))
    lines = ["## Distillation on world v2: quality against steps", "",
             f"Teacher `{first.get('pipeline')}` with guidance {GUIDANCE:g} (two evaluations per step); "
             "LCM-LoRA with LCMScheduler and no CFG pass; the full LCM and progressive students embed omega = "
             f"{GUIDANCE - 1:g} (one call per step). {len(first['prompts'])} held-out v2 prompts x "
             f"{first['images_per_prompt']} images. Coverage: distance of what captions leave open to the data's "
             "(0 = as close as data samples); FD on the shapes classifier's features.", "",
             *table(results), "", *verdicts(results), "", f"![quality vs steps]({png.name})", ""]
    (out / "table.md").write_text("\n".join(lines))
    return lines


def run_chain(teacher: Path, out: Path, images: int, prompts: int, per_prompt: int,
              overrides: dict[str, list[str]] | None = None, teacher_steps=TEACHER_STEPS,
              student_steps=STUDENT_STEPS) -> list[str]:
    """Data, the three students, their evaluations and the section; returns the section's Markdown lines."""
    data = write_data(out / "data", images)
    runs = train_students(teacher, data, out / "runs", overrides or {})
    results = evaluate_chain(teacher, runs, list(teacher_steps), list(student_steps), prompts, per_prompt)
    return write_section(out, results)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=TEACHER_V2, help="a world-v2 teacher pipeline folder")
    parser.add_argument("--out", type=Path, default=Path("demo_out/distill_v2"))
    parser.add_argument("--images", type=int, default=IMAGES, help="v2 images the students distil on")
    parser.add_argument("--prompts", type=int, default=PROMPTS)
    parser.add_argument("--images-per-prompt", type=int, default=IMAGES_PER_PROMPT)
    for name in STUDENTS:
        parser.add_argument(f"--{name}", dest=name.replace("-", "_"), action="append", default=[], metavar="KEY=VALUE",
                            help=f"an override of the {name} recipe (repeatable)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from trainers.errors import UserError

    if not (args.teacher / "model_index.json").is_file():
        raise UserError(f"no world-v2 teacher at {args.teacher}; build one with `python launch/demo_teacher.py "
                        f"--world v2 --out {args.teacher}`")
    overrides = {name: getattr(args, name.replace("-", "_")) for name in STUDENTS}
    lines = run_chain(args.teacher, args.out, args.images, args.prompts, args.images_per_prompt, overrides)
    print("\n".join(lines))
    print(f"table in {args.out / 'table.md'}, plot in {args.out / 'quality_vs_steps.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
