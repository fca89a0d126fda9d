"""The release's model card (`README.md`), written from the run's records: the model's config, the recipes that made
it (their data sources and weights), the evaluation and the release checks. Nothing in it is typed by hand except
what `CardFacts` is given."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_LIMITATIONS = [
    "Greedy answers were compared across formats on the held-out questions only; other prompts may differ more, "
    "above all in the 4-bit variants.",
    "The µP multipliers are folded into the GGUF weights (recorded under `falcon-h1.mup.*`): fine-tune the "
    "safetensors release, never a GGUF.",
]

NF4_ON_CPU = [
    "NF4 on a CPU with AVX512-BF16: bitsandbytes 0.50's packed CPU kernel needs output widths divisible by 32, "
    "which Mamba's in_proj does not have; set `support_avx512bf16_for_cpu = False` on those layers "
    "(`align.release_checks.cpu_safe_4bit`). GPUs are unaffected."
]


@dataclass
class CardFacts:
    """What the card says beyond the config: filled from the run's records (`offline_facts`) or by the caller."""

    name: str
    base_model: str = "not recorded"
    recipes: list[str] = field(default_factory=list)  # recipe YAML paths, in training order
    languages: list[str] = field(default_factory=list)
    license: str = "apache-2.0"
    intended_use: str = "not recorded"
    limitations: list[str] = field(default_factory=lambda: list(DEFAULT_LIMITATIONS))
    evaluation: list[str] = field(default_factory=list)  # markdown lines (a table) from the run's report


def recipe_lines(path) -> list[str]:
    """One recipe → markdown bullet lines: the file, its data sources with weights, the settings that define it."""
    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError:
        return [f"- `{path}` (not found when the card was written)"]
    keys = ("loss_type", "beta", "learning_rate", "num_train_epochs", "max_length", "use_peft", "packing")
    settings = ", ".join(f"{k} {recipe[k]}" for k in keys if k in recipe)
    lines = [f"- `{path}`: {settings}"]
    for source in recipe.get("sources", []):
        label = source.get("label") or source.get("path")
        lines.append(f"  - {label}: `{source.get('path')}`, weight {source.get('weight', 1.0)}")
    return lines


def format_table(checks: dict | None, manifest: dict) -> list[str]:
    """One row per format: file, size, the program that loaded it, agreement with our answers, exact match."""
    lines = [
        "| format | file | size | loaded by | answers equal ours | exact match |",
        "|---|---|---|---|---|---|",
    ]
    for fmt, info in manifest["formats"].items():
        got = (checks or {}).get("formats", {}).get(fmt, {})
        agree = f"{got['agreement']:.1%}" if "agreement" in got else "not checked"
        em = f"{got['exact_match']:.1%}" if "exact_match" in got else "not checked"
        size = f"{info['bytes'] / 2**20:.2f} MiB"
        lines.append(f"| {fmt} | `{info['file']}` | {size} | {got.get('loaded_by', '-')} | {agree} | {em} |")
    return lines


def write_card(path, config, manifest: dict, facts: CardFacts, checks: dict | None = None) -> Path:
    n_params = manifest.get("parameters")
    lines = [
        "---",
        f"license: {facts.license}",
        f"base_model: {facts.base_model}",
        "pipeline_tag: text-generation",
        "library_name: transformers",
        "tags: [falcon-h1, falcon-align, gguf]",
        *([f"language: [{', '.join(facts.languages)}]"] if facts.languages else []),
        "---",
        "",
        f"# {facts.name}",
        "",
        f"A Falcon-H1 model (`FalconH1ForCausalLM`, {config.num_hidden_layers} hybrid layers of attention ‖ "
        f"Mamba-2, hidden size {config.hidden_size}"
        + (f", {n_params / 1e6:.2f}M parameters" if n_params else "")
        + f", vocabulary {config.vocab_size}), aligned with falcon-align. Base model: `{facts.base_model}`.",
        "",
        "## Training",
        "",
        *[line for recipe in facts.recipes for line in recipe_lines(recipe)],
        "",
        "Languages: " + (", ".join(facts.languages) if facts.languages else "not recorded") + ".",
        "",
        "## Evaluation",
        "",
        *(facts.evaluation or ["Not recorded."]),
        "",
        "## Formats",
        "",
        *format_table(checks, manifest),
        "",
        'Answers: greedy replies to the held-out questions through the chat template; "answers equal ours" is the '
        "share whose first line equals the source model's in falcon-align. The GGUF files carry the µP multipliers "
        "folded into their weights. Quantised GGUF files were made by llama.cpp's own quantiser.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('.')  # or './nf4' with bitsandbytes installed",
        "tokenizer = AutoTokenizer.from_pretrained('.')",
        "```",
        "",
        "llama.cpp (stop tokens and chat template are in the file):",
        "",
        "```bash",
        f"llama-cli -m {_first_gguf(manifest)} -cnv --no-repack  # repacking crashed on small models' quantised files",
        "```",
        "",
        "## Intended use",
        "",
        facts.intended_use,
        "",
        "## Limitations",
        "",
        *[f"- {item}" for item in facts.limitations + (NF4_ON_CPU if "nf4" in manifest["formats"] else [])],
        "",
        f"## License\n\n{facts.license}",
        "",
    ]
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _first_gguf(manifest) -> str:
    files = [info["file"] for fmt, info in manifest["formats"].items() if fmt.startswith("gguf-")]
    return files[0] if files else "model.gguf"
