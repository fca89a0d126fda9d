"""Weighted instruction mixtures: sources → validated `messages` rows → weighted, deduplicated, reported.

A recipe declares its sources (hub ids or local json/jsonl/parquet), each with a column mapping, a weight
that can subsample (0.3) or oversample (3.5 = three full copies plus a seeded half), and optionally a
language. Malformed rows are counted per reason with examples and never dropped silently; past
`max_malformed_fraction` the run fails. Every build writes a report: rows and tokens per source and language.

Row counts are exact: a source with n valid rows and weight w contributes floor(w)·n rows (whole copies)
plus round((w − floor(w))·n) rows drawn without replacement with the mixture seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class SourceConfig:
    """One source of a mixture. `path` is a hub dataset id or a local .json/.jsonl/.parquet file."""

    path: str
    name: str | None = None  # hub config name
    split: str = "train"
    weight: float = 1.0
    language: str | None = None  # fixed language of every row
    language_column: str | None = None  # or: a column holding each row's language
    messages_column: str = "messages"
    prompt_column: str | None = None  # alternative layout: a prompt/response pair
    response_column: str | None = None
    system_column: str | None = None
    label: str | None = None  # name in reports (defaults to path)

    def __post_init__(self):
        if self.weight < 0 or not math.isfinite(self.weight):
            raise ValueError(f"source {self.path}: weight must be a finite number ≥ 0, got {self.weight}")
        if (self.prompt_column is None) != (self.response_column is None):
            raise ValueError(f"source {self.path}: give both prompt_column and response_column, or neither")

    @property
    def key(self) -> str:
        return self.label or self.path


@dataclass
class MixtureConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    language_weights: dict[str, float] | None = None  # multiplies the source weight of rows in that language
    other_languages_weight: float = 1.0  # multiplier for languages absent from language_weights (0 drops them)
    seed: int = 42
    dedup: bool = True  # drop exact duplicates (same messages) across and within sources, before weighting
    min_chars: int = 1  # length filter over the whole conversation text
    max_chars: int | None = None
    max_malformed_fraction: float = 0.01  # fail when more than this share of a source's rows is malformed
    eval_fraction: float = 0.0  # held-out share of each source (taken before weighting, never duplicated)

    def __post_init__(self):
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]


class MixtureError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- loading
def load_rows(source: SourceConfig) -> list[dict]:
    """Raw rows of one source as dicts. Local files are read directly; anything else goes to `datasets`."""
    path = Path(source.path)
    if path.suffix in (".json", ".jsonl") and path.exists():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise MixtureError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            return rows
        data = json.loads(text)
        if not isinstance(data, list):
            raise MixtureError(f"{path}: expected a JSON list of rows")
        return data
    if path.suffix == ".parquet" and path.exists():
        import datasets

        return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
    if path.suffix in (".json", ".jsonl", ".parquet"):
        raise MixtureError(f"{path}: file not found")
    import datasets  # hub id: only in user recipes, never in tests or the offline default

    return list(datasets.load_dataset(source.path, source.name, split=source.split))


def to_messages(row: dict, source: SourceConfig) -> tuple[list[dict] | None, str | None]:
    """→ (messages, None) for a valid row, (None, reason) for a malformed one."""
    if not isinstance(row, dict):
        return None, "row is not an object"
    if source.prompt_column:
        prompt, response = row.get(source.prompt_column), row.get(source.response_column)
        if not isinstance(prompt, str) or not isinstance(response, str):
            return None, f"'{source.prompt_column}'/'{source.response_column}' missing or not text"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if source.system_column and row.get(source.system_column):
            messages.insert(0, {"role": "system", "content": row[source.system_column]})
    else:
        messages = row.get(source.messages_column)
        if not isinstance(messages, list) or not messages:
            return None, f"'{source.messages_column}' missing or not a list of messages"
    clean = []
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            return None, "a message lacks 'role' or 'content'"
        if turn["role"] not in ROLES:
            return None, f"unknown role {turn['role']!r}"
        if not isinstance(turn["content"], str):
            return None, "message content is not text"
        if not turn["content"].strip():
            return None, "empty message content"
        clean.append({"role": turn["role"], "content": turn["content"]})
    if not any(t["role"] == "assistant" for t in clean):
        return None, "no assistant turn"
    if clean[-1]["role"] != "assistant":
        return None, "conversation does not end with an assistant turn"
    return clean, None


def _fingerprint(messages) -> str:
    return hashlib.sha1(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def _weighted(rows: list, weight: float, rng: random.Random) -> list:
    whole = math.floor(weight)
    extra = round((weight - whole) * len(rows))
    return rows * whole + rng.sample(rows, extra)


# ---------------------------------------------------------------------------------------------- building
@dataclass
class SourceReport:
    source: str
    weight: float
    raw_rows: int = 0
    malformed: int = 0
    malformed_reasons: dict = field(default_factory=dict)
    malformed_examples: list = field(default_factory=list)
    duplicates: int = 0
    length_filtered: int = 0
    valid_rows: int = 0
    eval_rows: int = 0
    train_rows: int = 0
    train_tokens: int = 0
    rows_per_language: dict = field(default_factory=dict)
    tokens_per_language: dict = field(default_factory=dict)


def build_mixture(config: MixtureConfig, count_tokens=None, loader=load_rows):
    """→ (train_rows, eval_rows, report). Rows are {"messages", "language", "source"}. `count_tokens`
    maps a messages list to a token count for the report (characters when None)."""
    count_tokens = count_tokens or (lambda m: sum(len(t["content"]) for t in m))
    rng = random.Random(config.seed)
    seen: set[str] = set()
    train, held_out, reports = [], [], []
    for source in config.sources:
        rep = SourceReport(source=source.key, weight=source.weight)
        valid = []
        raw = loader(source)
        rep.raw_rows = len(raw)
        reasons = Counter()
        for i, row in enumerate(raw):
            messages, reason = to_messages(row, source)
            if reason is not None:
                reasons[reason] += 1
                if len(rep.malformed_examples) < 5:
                    rep.malformed_examples.append({"row": i, "reason": reason, "value": _short(row)})
                continue
            text_len = sum(len(t["content"]) for t in messages)
            if text_len < config.min_chars or (config.max_chars is not None and text_len > config.max_chars):
                rep.length_filtered += 1
                continue
            if config.dedup:
                fp = _fingerprint(messages)
                if fp in seen:
                    rep.duplicates += 1
                    continue
                seen.add(fp)
            language = source.language or (row.get(source.language_column) if source.language_column else None)
            valid.append({"messages": messages, "language": language or "unknown", "source": source.key})
        rep.malformed = sum(reasons.values())
        rep.malformed_reasons = dict(reasons)
        rep.valid_rows = len(valid)
        if rep.raw_rows and rep.malformed / rep.raw_rows > config.max_malformed_fraction:
            raise MixtureError(
                f"source {source.key}: {rep.malformed} of {rep.raw_rows} rows malformed "
                f"({rep.malformed / rep.raw_rows:.1%} > max_malformed_fraction {config.max_malformed_fraction:.1%}); "
                f"reasons {dict(reasons)}; first examples {rep.malformed_examples[:3]}"
            )
        if config.eval_fraction:
            rng.shuffle(valid)
            n_eval = round(config.eval_fraction * len(valid))
            held_out.extend(valid[:n_eval])
            valid = valid[n_eval:]
            rep.eval_rows = n_eval
        by_language = defaultdict(list)
        for row in valid:
            by_language[row["language"]].append(row)
        for language in sorted(by_language):
            weight = source.weight * (config.language_weights or {}).get(language, config.other_languages_weight)
            picked = _weighted(by_language[language], weight, rng)
            tokens = sum(count_tokens(r["messages"]) for r in picked)
            rep.rows_per_language[language] = len(picked)
            rep.tokens_per_language[language] = tokens
            rep.train_rows += len(picked)
            rep.train_tokens += tokens
            train.extend(picked)
        reports.append(rep)
    rng.shuffle(train)
    return train, held_out, reports


def _short(value, limit=200):
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "…"


def write_report(reports: list[SourceReport], out_dir: str | Path, name="mixture_report") -> Path:
    """JSON (everything) and Markdown (tables) side by side; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps([asdict(r) for r in reports], indent=2, ensure_ascii=False))
    lines = [
        "# Mixture report",
        "",
        "| source | weight | raw | malformed | duplicates | length-filtered | eval | train rows | train tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r.source} | {r.weight} | {r.raw_rows} | {r.malformed} | {r.duplicates} | "
            f"{r.length_filtered} | {r.eval_rows} | {r.train_rows} | {r.train_tokens} |"
        )
    languages = defaultdict(lambda: [0, 0])
    for r in reports:
        for lang, n in r.rows_per_language.items():
            languages[lang][0] += n
            languages[lang][1] += r.tokens_per_language[lang]
    lines += ["", "| language | train rows | train tokens |", "|---|---|---|"]
    lines += [f"| {lang} | {n} | {t} |" for lang, (n, t) in sorted(languages.items())]
    bad = [r for r in reports if r.malformed]
    if bad:
        lines += ["", "## Malformed rows (counted, not trained on)", ""]
        for r in bad:
            lines.append(f"- {r.source}: {r.malformed} rows — {r.malformed_reasons}")
            lines += [f"  - row {e['row']}: {e['reason']}: `{e['value']}`" for e in r.malformed_examples]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
