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

from .validate import DATA_SUFFIXES, InputError, check_types, check_values, from_mapping, looks_local, shown

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
        check_types(self)
        if self.weight < 0 or not math.isfinite(self.weight):
            raise InputError(f"must be a finite number ≥ 0, got {self.weight}", "weight")
        if self.response_column is not None and self.prompt_column is None:
            raise InputError("needs a prompt_column next to it", "response_column")

    @property
    def key(self) -> str:
        return self.label or self.path

    @property
    def named(self) -> str:
        """The source as messages name it: its label and its path."""
        return f"{self.label} ({self.path})" if self.label and self.label != self.path else self.path


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
    # the trainer cuts rows at this many tokens keeping the start: a row whose answer starts past the cut would
    # train nothing and is dropped here, counted per source (None: no cut)
    max_length: int | None = None

    def __post_init__(self):
        self.sources = [from_mapping(SourceConfig, s, f"sources[{i}]") for i, s in enumerate(self.sources)]
        if self.kind not in KINDS:
            raise InputError(f"must be one of {KINDS}, got {self.kind!r}", "kind")
        check_values(self)


class MixtureError(InputError):
    """A source that cannot be used as it is: unreadable, empty, or too many malformed rows."""


# ---------------------------------------------------------------------------------------------- loading
class Rows(list):
    """A source's raw rows; `lines[i]` is row i's line in its .jsonl file (None elsewhere: rows count from 0)."""

    def __init__(self, rows, lines=None):
        super().__init__(rows)
        self.lines = lines


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _decode(path: Path, data: bytes, first_line: int = 1) -> str:
    """UTF-8 text of `data`, which starts at `first_line` of the file; else an error naming line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise MixtureError(
            f"not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); save the file as UTF-8",
            file=path,
            line=first_line + data.count(b"\n", 0, err.start),
        ) from None


def _parse_json(path: Path, text: str, line: int | None):
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise MixtureError(f"key {err.args[0]!r} appears twice in one object", file=path, line=line) from None
    except json.JSONDecodeError as err:
        at = line if line is not None else err.lineno
        raise MixtureError(f"not valid JSON ({err.msg}, column {err.colno})", file=path, line=at) from None


def _read_jsonl(path: Path) -> Rows:
    rows, lines = [], []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        text = _decode(path, raw, lineno).lstrip("\ufeff")  # a byte-order mark is not data
        if text.strip():
            rows.append(_parse_json(path, text, lineno))
            lines.append(lineno)
    return Rows(rows, lines)


def _read_json(path: Path) -> Rows:
    data = path.read_bytes()
    text = _decode(path, data).lstrip("\ufeff")
    rows = _parse_json(path, text, None) if text.strip() else []
    if not isinstance(rows, list):
        raise MixtureError(f"expected a JSON list of rows, got {shown(rows)}", file=path)
    return Rows(rows)


def load_rows(source: SourceConfig) -> Rows:
    """Raw rows of one source. Local files are read directly; anything else goes to `datasets`."""
    path = Path(source.path).expanduser()
    if path.is_dir() and path.suffix in DATA_SUFFIXES:
        raise MixtureError(f"is a folder; expected a {path.suffix} file", file=source.path)
    if path.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
        if path.suffix not in readers:
            raise MixtureError(f"unsupported file type {path.suffix!r}; give a {', '.join(readers)} file", file=path)
        rows = readers[path.suffix](path)
    elif not path.exists() and looks_local(source.path):
        raise MixtureError("no such data file (nor a hub dataset id of the form org/name)", file=source.path)
    else:  # hub id or a local dataset folder: only in user recipes, never in tests or the offline default
        rows = _read_with_datasets(source)
    if not rows:
        raise MixtureError("no rows: the source is empty", file=source.path)
    return rows


def _read_parquet(path: Path) -> Rows:
    import datasets

    try:
        return Rows(datasets.load_dataset("parquet", data_files=str(path), split="train"))
    except Exception as err:  # pyarrow's messages do not name the file
        raise MixtureError(f"not a readable parquet file ({type(err).__name__}: {err})", file=path) from None


def _read_with_datasets(source: SourceConfig) -> Rows:
    import datasets

    try:
        return Rows(datasets.load_dataset(source.path, source.name, split=source.split))
    except Exception as err:  # hub and folder errors do not say which source of the recipe failed
        raise MixtureError(f"could not load the dataset ({type(err).__name__}: {err})", file=source.path) from None


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
        if not isinstance(turn, dict):
            return None, "a message is not an object"
        if "role" not in turn or "content" not in turn:
            return None, "a message lacks 'role' or 'content'"
        if not isinstance(turn["role"], str) or turn["role"] not in ROLES:
            return None, f"unknown role {turn['role']!r} (roles: {', '.join(sorted(ROLES))})"
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


def _language(row: dict, source: SourceConfig) -> tuple[str | None, str | None]:
    """→ (language, None), or (None, reason) when the row's language column holds something other than text."""
    if source.language or not source.language_column:
        return source.language or "unknown", None
    value = row.get(source.language_column)
    if value in (None, ""):
        return "unknown", None
    if not isinstance(value, str):
        return None, f"'{source.language_column}' is not text"
    return value, None


class CharLengths:
    """Lengths in characters: the mixture's measure without a tokenizer. A measure maps a row's payload to
    (tokens the report counts, its longest sequence: what max_length cuts) and, through `answer_at`, to where its
    first trained token sits (the first assistant turn; the completion of a preference pair)."""

    def __call__(self, payload) -> tuple[int, int]:
        if "messages" in payload:
            n = _chars(payload)
            return n, n
        prompt = _text_len(payload["prompt"])
        return _chars(payload), prompt + max(_text_len(payload["chosen"]), _text_len(payload["rejected"]))

    def answer_at(self, payload) -> int:
        return _text_len(prompt_turns(payload))


def prompt_turns(payload) -> list[dict]:
    """The turns before the first trained one: up to the first assistant turn, or a pair's prompt."""
    if "messages" not in payload:
        return payload["prompt"]
    turns = payload["messages"]
    return turns[: next(i for i, t in enumerate(turns) if t["role"] == "assistant")]


def _text_len(turns) -> int:
    return sum(len(t["content"]) for t in turns)


# ---------------------------------------------------------------------------------------------- building
@dataclass
class SourceReport:
    source: str
    weight: float
    path: str = ""
    raw_rows: int = 0
    malformed: int = 0
    malformed_reasons: dict = field(default_factory=dict)
    malformed_examples: list = field(default_factory=list)
    duplicates: int = 0
    length_filtered: int = 0
    truncated: int = 0  # longer than max_length, cut, some of the answer kept: trained
    too_long: int = 0  # the whole answer past max_length: dropped, never trained
    too_long_examples: list = field(default_factory=list)
    valid_rows: int = 0
    eval_rows: int = 0
    train_rows: int = 0
    train_tokens: int = 0
    rows_per_language: dict = field(default_factory=dict)
    tokens_per_language: dict = field(default_factory=dict)


def build_mixture(config: MixtureConfig, measure=None, loader=load_rows):
    """→ (train_rows, eval_rows, report). Rows are {"messages", "language", "source"} (SFT) or {"prompt",
    "chosen", "rejected", "language", "source"} (preference). `measure` gives a row's lengths as its trainer
    tokenizes it (see CharLengths, the default, for the interface); with `config.max_length` it decides which
    rows the cut leaves without an answer."""
    measure = measure or CharLengths()
    rng = random.Random(config.seed)
    seen: set[str] = set()
    tokens: dict[int, int] = {}  # id(row) → its tokens, measured once however often it is picked
    train, held_out, reports = [], [], []
    for source in config.sources:
        rep = SourceReport(source=source.key, weight=source.weight, path=source.path)
        valid = _valid_rows(config, source, loader(source), rep, seen, measure, tokens)
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
            n_tokens = sum(tokens[id(r)] for r in picked)
            rep.rows_per_language[language] = len(picked)
            rep.tokens_per_language[language] = n_tokens
            rep.train_rows += len(picked)
            rep.train_tokens += n_tokens
            train.extend(picked)
        reports.append(rep)
    if config.sources and not any(r.valid_rows for r in reports):
        raise MixtureError("no training rows left; per source: " + "; ".join(_dropped(r) for r in reports))
    rng.shuffle(train)
    return train, held_out, reports


def _valid_rows(config, source, raw, rep, seen, measure, tokens) -> list[dict]:
    """Validates, filters, deduplicates and measures one source's rows, counting every drop in `rep`."""
    convert = to_messages if config.kind == "sft" else to_preference
    lines = getattr(raw, "lines", None)
    rep.raw_rows = len(raw)
    reasons, valid = Counter(), []
    for i, row in enumerate(raw):
        where = {"line": lines[i]} if lines else {"row": i}
        payload, reason = convert(row, source)
        language = None
        if reason is None:
            language, reason = _language(row, source)
        if reason is not None:
            reasons[reason] += 1
            if len(rep.malformed_examples) < 5:
                rep.malformed_examples.append({**where, "reason": reason, "value": _short(row)})
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
        n_tokens, longest = measure(payload)
        if config.max_length is not None and longest > config.max_length:
            answer_at = measure.answer_at(payload)
            if answer_at >= config.max_length:
                rep.too_long += 1
                if len(rep.too_long_examples) < 5:
                    rep.too_long_examples.append({**where, "tokens": longest, "answer_at": answer_at})
                continue
            rep.truncated += 1
        row = {**payload, "language": language, "source": source.key}
        tokens[id(row)] = n_tokens
        valid.append(row)
    rep.malformed = sum(reasons.values())
    rep.malformed_reasons = dict(reasons)
    rep.valid_rows = len(valid)
    if rep.raw_rows and rep.malformed / rep.raw_rows > config.max_malformed_fraction:
        first = "; ".join(f"{_where(e)}: {e['reason']}" for e in rep.malformed_examples[:3])
        raise MixtureError(
            f"{rep.malformed} of {rep.raw_rows} rows malformed ({rep.malformed / rep.raw_rows:.1%} > "
            f"max_malformed_fraction {config.max_malformed_fraction:.1%}); reasons {dict(reasons)}; first: {first}",
            field=f"source {source.label!r}" if source.label else None,
            file=source.path,
        )
    return valid


def _where(example: dict) -> str:
    return f"line {example['line']}" if "line" in example else f"row {example['row']}"


def _dropped(rep: SourceReport) -> str:
    return (
        f"{rep.source}: {rep.raw_rows} rows, {rep.malformed} malformed, {rep.duplicates} duplicates, "
        f"{rep.length_filtered} length-filtered, {rep.too_long} too long for max_length (answer cut off), "
        f"{rep.eval_rows} held out"
    )


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
        "| source | weight | raw | malformed | duplicates | length-filtered | truncated | too long (dropped) | eval "
        "| train rows | train tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r.source} | {r.weight} | {r.raw_rows} | {r.malformed} | {r.duplicates} | {r.length_filtered} | "
            f"{r.truncated} | {r.too_long} | {r.eval_rows} | {r.train_rows} | {r.train_tokens} |"
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
            lines.append(f"- {r.source} ({r.path}): {r.malformed} rows — {r.malformed_reasons}")
            lines += [f"  - {_where(e)}: {e['reason']}: `{e['value']}`" for e in r.malformed_examples]
    long = [r for r in reports if r.too_long]
    if long:
        lines += ["", "## Rows too long for max_length (the answer starts past the cut: dropped, not trained on)", ""]
        for r in long:
            lines.append(f"- {r.source} ({r.path}): {r.too_long} rows")
            lines += [
                f"  - {_where(e)}: {e['tokens']} tokens, the answer starts at token {e['answer_at']}"
                for e in r.too_long_examples
            ]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
