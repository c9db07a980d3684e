"""demo_out/report.md: the demo's metric tables, sample grids and plots (matplotlib, written as PNG)."""
from __future__ import annotations

import json
from pathlib import Path

FACTORS = ("colour", "shape", "size", "position", "all", "all_but_position")


CONTROL_PROMPTS = ("empty", "full")  # evaluations of the ControlNet stage: "<model>/<captions>"


def write_report(out: Path, run: Path, evaluations: dict, concept: dict, note: str = "",
                 sections: list[str] = ()) -> Path:
    """Write every evaluation's results folder, the plots and report.md (`sections`: Markdown lines of further
    chains, after the tables); returns the report's path."""
    from launch.evaluate import write_results

    folders = {name: write_results(results, out / "eval" / name.replace("/", "-")) for name, results in evaluations.items()}
    loss_png = plot_losses(run / "logs" / "metrics.jsonl", out / "loss.png")
    steps_png = plot_steps(evaluations, out / "adherence_vs_steps.png")
    concept_words = ", ".join(f"{k} {v}" for k, v in concept.items())
    lines = ["# difftune demo", "",
             f"A LoRA teaches the demo teacher (a tiny text-to-image model trained from scratch on synthetic shapes, "
             f"`assets/demo_teacher`) a concept absent from its data: {concept_words}. Adherence is the fraction of "
             "generated images whose shape, colour, size and position (read back by deterministic image analysis) "
             "match the prompt; SWD is the sliced Wasserstein distance to real renders of the same prompts "
             "(lower is better). Old prompts never name the concept; new prompts always do. The lcm-lora rows are an "
             "LCM-LoRA distilled from the teacher, sampled with LCMScheduler in 1-4 steps and no CFG pass; compare "
             "them with the teacher's rows at the same steps.", "",
             *([note, ""] if note else []), *table_head("prompts")]
    control = {k: v for k, v in evaluations.items() if k.split("/")[1] in CONTROL_PROMPTS}
    for name, results in sorted(evaluations.items(), key=lambda item: item[0].split("/")[1]):
        model, prompts = name.split("/")
        if name in control:
            continue
        real = results["real"]
        if model == "teacher":  # the same prompts and renders for both models: one row of real images
            lines.append(f"| real images | {prompts} | - | " + cells(real) + f" | {real['swd']:.4f} |")
        for entry in results["runs"]:
            lines.append(f"| {model} | {prompts} | {entry['steps']} | " + cells(entry) + f" | {entry['swd']:.4f} |")
    lines += ["", f"![loss]({loss_png.relative_to(out)})", "", f"![adherence vs steps]({steps_png.relative_to(out)})", ""]
    if control:
        lines += controlnet_section(control)
    lines += list(sections)
    for name, folder in folders.items():
        results = evaluations[name]
        last = results["runs"][-1]["steps"]
        lines += [f"## {name}: {results['scheduler']}, guidance {results['guidance']:g}, {last} steps", "",
                  f"![{name}]({(folder / f'grid-{last}.png').relative_to(out)})", "",
                  f"Full table: [{(folder / 'results.md').relative_to(out)}]({(folder / 'results.md').relative_to(out)})", ""]
    grids = sorted((run / "samples").glob("step-*.png"), key=lambda p: int(p.stem[5:]))
    if grids:
        lines += ["## Validation grids during LoRA training", ""]
        lines += [f"![{g.stem}]({(run / 'samples' / g.name).relative_to(out)})" for g in grids]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def controlnet_section(control: dict) -> list[str]:
    """A table of the ControlNet stage: where the shape lands with and without the edge map."""
    lines = ["## ControlNet: shapes where the edge map draws them", "",
             "The ControlNet (recipes/demo/sd15_controlnet_tiny.yaml) is given the outline of a render of each "
             "held-out prompt's factors. From the empty prompt the teacher alone can only guess position, shape and "
             "size; with the edge map they should follow it. Colour and background are not in an outline: from the "
             "empty prompt they stay guesses, with the full prompt they come from the text.", "",
             *table_head("prompt")]
    for name, results in control.items():
        model, captions = name.split("/")
        label = "teacher alone" if model == "teacher" else "teacher + ControlNet"
        for entry in results["runs"]:
            lines.append(f"| {label} | {captions} | {entry['steps']} | " + cells(entry) + f" | {entry['swd']:.4f} |")
    return lines + [""]


def table_head(prompts: str) -> list[str]:
    """The header of a results table: model, prompts, steps, one column per factor, SWD."""
    return [f"| model | {prompts} | steps | " + " | ".join(f.replace("_", " ") for f in FACTORS) + " | SWD |",
            "|---|---|---:|" + "---:|" * (len(FACTORS) + 1)]


def cells(entry: dict) -> str:
    return " | ".join(f"{entry['adherence'][f]:.3f}" for f in FACTORS)


def plot_losses(metrics: Path, png: Path) -> Path:
    """Training loss per logging interval, and the held-out loss where the run logged one."""
    plt = pyplot()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for key, label in (("loss", "training loss"), ("val_loss", "held-out loss")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="." if key == "val_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def plot_steps(evaluations: dict, png: Path) -> Path:
    """All-factor adherence (solid) and without position (dashed) against sampling steps, per evaluation."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for name, results in evaluations.items():
        runs = results["runs"]
        if len(runs) < 2:
            continue
        steps = [r["steps"] for r in runs]
        line, = ax.plot(steps, [r["adherence"]["all"] for r in runs], marker="o", label=f"{name} all")
        ax.plot(steps, [r["adherence"]["all_but_position"] for r in runs], marker="o", linestyle="--",
                color=line.get_color(), label=f"{name} w/o position")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("adherence")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt
