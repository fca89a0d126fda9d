"""Weighted mixtures: sources → validated rows → weighted, deduplicated, reported. One machinery for SFT
(`messages` conversations) and preference data (`prompt` + `chosen`/`rejected` completions, for DPO).

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
    chosen_column: str = "chosen"  # preference data: completions as text, or message lists (with or without
    rejected_column: str = "rejected"  # the prompt turns; without prompt_column the shared prefix is the prompt)
    label: str | None = None  # name in reports (defaults to path)

    def __post_init__(self):
        if self.weight < 0 or not math.isfinite(self.weight):
            raise ValueError(f"source {self.path}: weight must be a finite number ≥ 0, got {self.weight}")
        if self.response_column is not None and self.prompt_column is None:
            raise ValueError(f"source {self.path}: response_column needs a prompt_column")

    @property
    def key(self) -> str:
        return self.label or self.path


KINDS = ("sft", "preference")


@dataclass
class MixtureConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    kind: str = "sft"  # "sft": rows become {"messages"}; "preference": {"prompt", "chosen", "rejected"}
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
        if self.kind not in KINDS:
            raise ValueError(f"mixture kind must be one of {KINDS}, got {self.kind!r}")


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
    if source.prompt_column and not source.response_column:
        return None, f"source {source.key}: SFT rows need response_column next to prompt_column"
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
    clean, reason = _clean_turns(messages)
    if reason:
        return None, reason
    if not any(t["role"] == "assistant" for t in clean):
        return None, "no assistant turn"
    if clean[-1]["role"] != "assistant":
        return None, "conversation does not end with an assistant turn"
    return clean, None


def _clean_turns(messages) -> tuple[list[dict] | None, str | None]:
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
    return clean, None


def _as_turns(value, role: str):
    """Text → one message of `role`; a message list as is; anything else → None."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return value if isinstance(value, list) else None


def to_preference(row: dict, source: SourceConfig) -> tuple[dict | None, str | None]:
    """→ ({"prompt", "chosen", "rejected"} as message lists, None), or (None, reason). Layouts: explicit prompt
    (text or messages) with completions (text or messages), or whole conversations in chosen/rejected whose
    shared leading turns are the prompt (UltraFeedback-binarized style)."""
    if not isinstance(row, dict):
        return None, "row is not an object"
    for column in (source.chosen_column, source.rejected_column, source.prompt_column):
        if column and row.get(column) in (None, "", []):
            return None, f"'{column}' missing or empty"
    chosen = _as_turns(row[source.chosen_column], "assistant")
    rejected = _as_turns(row[source.rejected_column], "assistant")
    if chosen is None or rejected is None:
        return None, f"'{source.chosen_column}'/'{source.rejected_column}' is neither text nor a message list"
    prompt = []
    if source.prompt_column:
        prompt = _as_turns(row[source.prompt_column], "user")
        if prompt is None:
            return None, f"'{source.prompt_column}' is neither text nor a message list"
        if source.system_column and row.get(source.system_column):
            prompt = [{"role": "system", "content": row[source.system_column]}] + prompt
    parts = {}
    for name, turns in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        parts[name], reason = _clean_turns(turns)
        if reason:
            return None, f"{name}: {reason}"
    if not source.prompt_column:  # implicit prompt: the turns both conversations share
        shared = 0
        while shared < min(len(parts["chosen"]), len(parts["rejected"])) - 1 and (
            parts["chosen"][shared] == parts["rejected"][shared]
        ):
            shared += 1
        parts["prompt"] = parts["chosen"][:shared]
        parts["chosen"], parts["rejected"] = parts["chosen"][shared:], parts["rejected"][shared:]
    else:  # completions that repeat the prompt turns (with or without the system turn added from system_column)
        for repeated in (parts["prompt"], [t for t in parts["prompt"] if t["role"] != "system"]):
            n = len(repeated)
            if n and parts["chosen"][:n] == repeated == parts["rejected"][:n]:
                parts["chosen"], parts["rejected"] = parts["chosen"][n:], parts["rejected"][n:]
                break
    if not parts["prompt"] or parts["prompt"][-1]["role"] == "assistant":
        return None, "no prompt (the conversation must open with a user turn before the compared completions)"
    for name in ("chosen", "rejected"):
        if not parts[name] or any(t["role"] != "assistant" for t in parts[name]):
            return None, f"{name} completion is not assistant text"
    if parts["chosen"] == parts["rejected"]:
        return None, "chosen and rejected are identical"
    return parts, None


def _fingerprint(payload) -> str:
    return hashlib.sha1(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def _chars(payload) -> int:
    if "messages" in payload:
        return sum(len(t["content"]) for t in payload["messages"])
    turns = payload["prompt"] + payload["chosen"] + payload["rejected"]
    return sum(len(t["content"]) for t in turns)


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
    """→ (train_rows, eval_rows, report). Rows are {"messages", "language", "source"} (SFT) or {"prompt",
    "chosen", "rejected", "language", "source"} (preference). `count_tokens` maps a row's payload (the messages
    list for SFT, the {"prompt", "chosen", "rejected"} dict for preference) to a token count for the report
    (characters when None)."""
    if count_tokens is None:
        count_tokens = lambda payload: _chars(payload if isinstance(payload, dict) else {"messages": payload})
    convert = to_messages if config.kind == "sft" else to_preference
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
            payload, reason = convert(row, source)
            if reason is not None:
                reasons[reason] += 1
                if len(rep.malformed_examples) < 5:
                    rep.malformed_examples.append({"row": i, "reason": reason, "value": _short(row)})
                continue
            payload = {"messages": payload} if config.kind == "sft" else payload
            text_len = _chars(payload)
            if text_len < config.min_chars or (config.max_chars is not None and text_len > config.max_chars):
                rep.length_filtered += 1
                continue
            if config.dedup:
                fp = _fingerprint(payload)
                if fp in seen:
                    rep.duplicates += 1
                    continue
                seen.add(fp)
            language = source.language or (row.get(source.language_column) if source.language_column else None)
            valid.append({**payload, "language": language or "unknown", "source": source.key})
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
            tokens = sum(count_tokens(_payload(r, config.kind)) for r in picked)
            rep.rows_per_language[language] = len(picked)
            rep.tokens_per_language[language] = tokens
            rep.train_rows += len(picked)
            rep.train_tokens += tokens
            train.extend(picked)
        reports.append(rep)
    rng.shuffle(train)
    return train, held_out, reports


def _payload(row: dict, kind: str):
    return row["messages"] if kind == "sft" else {k: row[k] for k in ("prompt", "chosen", "rejected")}


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
