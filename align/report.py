"""The pipeline's report: `report.md` with tables and PNG plots (training curves, per-language results).

    python -m align.report --run runs/offline     # re-draws the plots and report.md from report.json

Plots use matplotlib's non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODELS = ("base", "sft", "dpo", "grpo")
LABELS = {"base": "Base", "sft": "SFT", "dpo": "DPO (Instruct)", "grpo": "GRPO"}


def log_history(run_dir: Path) -> list[dict]:
    """A trainer's log history (trainer_state.json in its output dir, else the newest checkpoint's)."""
    run_dir = Path(run_dir)
    candidates = [run_dir / "trainer_state.json"] + sorted(
        run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]), reverse=True
    )
    for path in candidates:
        if path.exists():
            return json.loads(path.read_text())["log_history"]
    return []


def series(history, key):
    points = [(h["step"], h[key]) for h in history if key in h and "train_runtime" not in h]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training(run: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    base = (
        json.loads((run / "base" / "base_report.json").read_text())
        if (run / "base" / "base_report.json").exists()
        else {}
    )
    if base.get("losses"):
        axes[0].plot(range(len(base["losses"])), base["losses"], color="tab:gray")
    axes[0].set(title="Pretraining (tiny base)", xlabel="step", ylabel="LM loss")
    axes[1].plot(*series(log_history(run / "sft"), "loss"), color="tab:blue")
    axes[1].set(title="SFT", xlabel="step", ylabel="loss (assistant tokens)")
    dpo = log_history(run / "dpo")
    axes[2].plot(*series(dpo, "loss"), color="tab:red", label="DPO loss")
    axes[2].axhline(0.6931, color="tab:red", linestyle=":", linewidth=1, label="ln 2 (start)")
    twin = axes[2].twinx()
    twin.plot(*series(dpo, "rewards/accuracies"), color="tab:green", label="reward accuracy (train)")
    twin.set_ylim(0, 1)
    axes[2].set(title="DPO", xlabel="step", ylabel="loss")
    twin.set_ylabel("reward accuracy")
    handles = axes[2].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axes[2].legend(handles=handles, loc="lower left", fontsize=8)
    plot_rewards(axes[3], log_history(run / "grpo"))
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rewards(ax, history) -> None:
    """GRPO's reward curve: the weighted reward and each reward's mean per logged step (sampled completions)."""
    ax.plot(*series(history, "reward"), color="black", label="reward (weighted sum)")
    names = sorted({k for h in history for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    for name in names:
        ax.plot(*series(history, name), linewidth=1, label=name.removeprefix("rewards/").removesuffix("/mean"))
    ax.set(title="GRPO", xlabel="step", ylabel="mean reward of sampled completions")
    ax.legend(loc="lower right", fontsize=8)


def plot_per_language(results: dict, key: str, models, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    languages = sorted(results[models[0]][key]["per_language"])
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(8, 0.8 * len(languages)), 4))
    for i, name in enumerate(models):
        values = [results[name][key]["per_language"][lang] for lang in languages]
        ax.bar([x + i * width for x in range(len(languages))], values, width, label=LABELS[name])
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(languages))], languages)
    ax.set(title=title, ylabel="accuracy", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(run: Path, report: dict) -> Path:
    """report.md and plots/*.png from the pipeline's report dict (also saved as report.json)."""
    run = Path(run)
    plots = run / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    results = report["results"]
    plot_training(run, plots)
    plot_per_language(
        results, "exact_match", MODELS, "Held-out exact match per language", plots / "exact_match_by_language.png"
    )
    plot_per_language(
        results,
        "preference",
        ("sft", "dpo"),
        "Held-out preference accuracy per language (chosen more likely than rejected)",
        plots / "preference_by_language.png",
    )
    em = {m: results[m]["exact_match"] for m in MODELS}
    pref = {m: results[m]["preference"] for m in MODELS}
    lines = [
        "# Offline default: Base → SFT → DPO, and SFT → GRPO",
        "",
        f"Metrics on held-out data ({em['base']['n']} questions, {pref['sft']['n']} preference pairs; "
        "never trained on):",
        "- **exact match**: the first line of the greedy reply to the chat prompt equals the answer;",
        "- **preference accuracy**: the chosen answer gets a higher mean log-prob per token than the rejected near "
        "miss (ties count half);",
        "- **implicit reward** (DPO vs its SFT reference): β·(mean log π − mean log π_ref) per completion; its "
        "accuracy (chosen > rejected) and mean margin.",
        "",
        "| model | exact match | preference accuracy |",
        "|---|---|---|",
    ]
    lines += [f"| {LABELS[m]} | {em[m]['overall']:.1%} | {pref[m]['accuracy']:.1%} |" for m in MODELS]
    dpo_pref = pref["dpo"]
    lines += [
        "",
        f"DPO implicit reward on held-out pairs: accuracy {dpo_pref['reward_accuracy']:.1%}, mean margin "
        f"{dpo_pref['reward_margin']:.3f} (chosen {dpo_pref['rewards_chosen']:.3f}, rejected "
        f"{dpo_pref['rewards_rejected']:.3f}).",
        "",
        "![training curves](plots/training_curves.png)",
        "",
        "![exact match per language](plots/exact_match_by_language.png)",
        "",
        "![preference accuracy per language](plots/preference_by_language.png)",
        "",
        "Held-out exact match per language:",
        "",
        *language_table(results, "exact_match", MODELS),
        "",
        "Held-out preference accuracy per language:",
        "",
        *language_table(results, "preference", MODELS),
    ]
    lines += ["", "Sample DPO replies (held-out):", ""]
    lines += [f"- {e['q']} → `{e['reply'].strip()}` (answer {e['answer']})" for e in em["dpo"]["examples"]]
    lines += release_table(report.get("release"))
    lines += ["", "Timings: " + format_timings(report["timings"]), ""]
    lines += [
        "For real checkpoints, run lm-eval-harness on the saved model (it loads in vanilla transformers):",
        "",
        "```bash",
        "lm_eval --model hf --model_args pretrained=runs/falcon-h1-0.5b-dpo-full,dtype=bfloat16 \\",
        "    --tasks ifeval,gsm8k,mmlu --batch_size auto --apply_chat_template",
        "```",
    ]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def language_table(results: dict, key: str, models) -> list[str]:
    """Markdown rows: one per model, one column per language (`results[model][key]["per_language"]`)."""
    languages = sorted(results[models[0]][key]["per_language"])
    lines = ["| model | " + " | ".join(languages) + " |", "|---" * (len(languages) + 1) + "|"]
    for name in models:
        values = [results[name][key]["per_language"].get(lang) for lang in languages]
        lines.append(f"| {LABELS[name]} | " + " | ".join("–" if v is None else f"{v:.1%}" for v in values) + " |")
    return lines


def release_table(checks: dict | None) -> list[str]:
    """The release's formats, one row each: who loaded it, answers equal to the Instruct model's, exact match."""
    if not checks:
        return []
    lines = [
        "",
        "Release (`release/`, align/release.py): each format answers the held-out questions, loaded by the program "
        "that serves it.",
        "",
        "| format | loaded by | answers equal ours | exact match |",
        "|---|---|---|---|",
    ]
    for fmt, r in checks["formats"].items():
        lines.append(f"| {fmt} | {r['loaded_by']} | {r['agreement']:.1%} | {r['exact_match']:.1%} |")
    if checks.get("problems"):
        return lines + ["", "Release checks failed: " + "; ".join(checks["problems"])]
    return lines + ["", "Release checks: all hold."]


def format_timings(timings: dict) -> str:
    """`{"base_s": 61.2, "sft_s": None}` → "base 61.2 s, sft not recorded". A stage a rerun skipped keeps the time
    it took when it was made."""
    shown = [f"{k.removesuffix('_s')} {'not recorded' if v is None else f'{v} s'}" for k, v in timings.items()]
    return ", ".join(shown) + " (a stage an earlier run made shows the time it took then)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/offline")
    args = parser.parse_args(argv)
    run = Path(args.run)
    print(write(run, json.loads((run / "report.json").read_text())))


if __name__ == "__main__":
    main()
