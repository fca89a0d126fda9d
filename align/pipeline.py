"""The offline default, end to end: base → SFT → evaluation → report. `make run` runs this.

    python -m align.pipeline [--out runs/offline] [--force]

Each stage skips work already done (its output directory holds a finished model); `--force` redoes all.
Everything runs on CPU with no network: the base model and tokenizer are made by align/offline/base.py, the
data ship in data/offline. (DPO joins between SFT and evaluation with the DPO issue.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from . import sft
from .eval import exact_match_by_language, load_for_eval, load_jsonl, subsample
from .offline.base import make_base

SFT_RECIPE = "recipes/tiny/sft.yaml"


def done(path: Path) -> bool:
    return (path / "model.safetensors").exists() and (path / "config.json").exists()


def run(out: Path, force: bool = False, base_steps: int = 150, per_language: int = 40) -> dict:
    out = Path(out)
    if force and out.exists():
        shutil.rmtree(out)
    timings = {}
    base_dir, sft_dir = out / "base", out / "sft"

    t = time.perf_counter()
    if not done(base_dir):
        print(f"[1/3] base model → {base_dir}", flush=True)
        make_base(base_dir, steps=base_steps)
    else:
        print(f"[1/3] base model: {base_dir} exists, skipped", flush=True)
    timings["base_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    if not done(sft_dir):
        print(f"[2/3] SFT ({SFT_RECIPE}) → {sft_dir}", flush=True)
        sft.main(["--config", SFT_RECIPE, "--model_name_or_path", str(base_dir), "--output_dir", str(sft_dir)])
    else:
        print(f"[2/3] SFT: {sft_dir} exists, skipped", flush=True)
    timings["sft_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    print("[3/3] held-out exact match, base vs SFT (same chat prompt, greedy)", flush=True)
    rows = subsample(load_jsonl("data/offline/heldout.jsonl"), per_language)
    results = {
        name: exact_match_by_language(*load_for_eval(path), rows)
        for name, path in (("base", base_dir), ("sft", sft_dir))
    }
    timings["eval_s"] = round(time.perf_counter() - t, 1)

    report = {
        "metric": "exact match of the first reply line, held-out questions, greedy",
        "timings": timings,
        **{name: r for name, r in results.items()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    write_markdown(out / "report.md", results, timings)
    print_table(results)
    print(f"\nreport: {out / 'report.md'}\ncheckpoints: {base_dir} (Base), {sft_dir} (SFT)")
    return report


def write_markdown(path: Path, results: dict, timings: dict) -> None:
    langs = sorted(results["base"]["per_language"])
    lines = [
        "# Offline default: Base vs SFT",
        "",
        "Metric: exact match of the first reply line on held-out questions (greedy, chat prompt).",
        "",
        "| language | Base | SFT |",
        "|---|---|---|",
    ]
    lines += [
        f"| {lang} | {results['base']['per_language'][lang]:.1%} | {results['sft']['per_language'][lang]:.1%} |"
        for lang in langs
    ]
    lines += [
        f"| **all** | **{results['base']['overall']:.1%}** | **{results['sft']['overall']:.1%}** |",
        "",
        f"Timings (s): {timings}",
        "",
        "Sample SFT replies:",
        "",
    ]
    lines += [f"- {e['q']} → `{e['reply'].strip()}` (answer {e['answer']})" for e in results["sft"]["examples"]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def print_table(results: dict) -> None:
    print("\n| language | Base | SFT |\n|---|---|---|")
    for lang in sorted(results["base"]["per_language"]):
        print(f"| {lang} | {results['base']['per_language'][lang]:.1%} | {results['sft']['per_language'][lang]:.1%} |")
    print(f"| all | {results['base']['overall']:.1%} | {results['sft']['overall']:.1%} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/offline")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--base-steps", type=int, default=150)
    args = parser.parse_args(argv)
    report = run(Path(args.out), args.force, args.base_steps)
    if report["sft"]["overall"] <= report["base"]["overall"]:
        raise SystemExit("SFT did not beat the base model on the held-out tasks")


if __name__ == "__main__":
    main()
