"""What a user hands in, checked in one place: recipe values and data rows. Every error names its culprit —
the file, the line (or row) and the field — so that a bad value is fixed where it was written:

    recipes/tiny/sft.yaml:14: sources[1].weight: expected a number, got '2' (text)
    data/offline/sft_counting.jsonl:17: not valid UTF-8 (byte 0xff at column 40)

Recipe values are checked when the recipe is parsed (`RecipeParser`: types, ranges, unknown and repeated keys);
paths when they are used (a recipe may name a checkpoint or data file that an earlier stage makes). Data rows are
checked as the mixture reads them (align/data.py): file-level damage is an error, a malformed row is counted
and reported with its line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path

import yaml
from trl import TrlParser


class InputError(ValueError):
    """Bad input. `str()` reads `file:line: field: problem`, each part present when known."""

    def __init__(self, problem: str, field: str | None = None, file=None, line: int | None = None):
        self.problem, self.field, self.file, self.line = problem, field, file, line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file and self.line else (str(self.file) if self.file else "")
        return ": ".join(part for part in (where, self.field, self.problem) if part)

    def inside(self, field: str) -> InputError:
        """The same problem, its field seen from the enclosing value (`weight` inside `sources[1]`)."""
        joined = f"{field}.{self.field}" if self.field else field
        return InputError(self.problem, joined, self.file, self.line)


# ---------------------------------------------------------------------------------------------- types
def _is(value, hint) -> bool:
    """Whether `value` fits the type hint; hints this does not know are accepted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_is(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict) and all(_is(k, args[0]) and _is(v, args[1]) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


_NAMES = {str: "text", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}


def describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is list:
        return f"a list of ({describe(args[0])})" if args else "a list"
    if origin is dict:
        return f"a mapping of {describe(args[0])} to {describe(args[1])}"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def shown(value) -> str:
    """A value and its YAML/JSON kind, for messages: `'2' (text)`."""
    kind = _NAMES.get(type(value)) or {list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({kind})"


def check_types(obj) -> None:
    """Every field of a dataclass against its type hint; the first mismatch raises, naming the field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _is(value, hints[f.name]):
            raise InputError(f"expected {describe(hints[f.name])}, got {shown(value)}", f.name)


def from_mapping(cls, value, field: str):
    """A dataclass from a recipe mapping: unknown keys (with the nearest known name) and bad types name the field."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise InputError(f"expected a mapping of {cls.__name__} fields, got {shown(value)}", field)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in known:
            raise InputError(f"unknown key{_nearest(key, known)}; known keys: {', '.join(known)}", f"{field}.{key}")
    try:
        return cls(**value)
    except InputError as err:
        raise err.inside(field) from None
    except TypeError as err:  # a required field left out
        raise InputError(str(err).split(".__init__() ")[-1], field) from None


def _nearest(key, known) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------- ranges
def _at_least(low, integer=False, strict=False):
    def ok(v):
        kind = int if integer else float
        return _is(v, kind) and math.isfinite(v) and (v > low if strict else v >= low)

    word = "an integer" if integer else "a number"
    return ok, f"must be {word} {'>' if strict else '≥'} {low}"


def _fraction(upper_open: bool):
    return (
        lambda v: _is(v, float) and 0 <= v and (v < 1 if upper_open else v <= 1),
        f"must be a number in [0, 1{')' if upper_open else ']'}",
    )


_OPTIONAL_POSITIVE_INT = (lambda v: v is None or _at_least(1, integer=True)[0](v), "must be an integer ≥ 1 or null")

# recipe values whose bad settings fail late, obscurely or silently (transformers checks some others itself)
RANGES = {
    "max_length": _OPTIONAL_POSITIVE_INT,
    "max_prompt_length": _OPTIONAL_POSITIVE_INT,
    "per_device_train_batch_size": _at_least(1, integer=True),
    "per_device_eval_batch_size": _at_least(1, integer=True),
    "gradient_accumulation_steps": _at_least(1, integer=True),
    "learning_rate": _at_least(0),
    "weight_decay": _at_least(0),
    "max_grad_norm": _at_least(0),
    "num_train_epochs": _at_least(0, strict=True),
    "warmup_steps": _at_least(0),
    "logging_steps": _at_least(0, strict=True),
    "save_steps": _at_least(0, strict=True),
    "beta": _at_least(0, strict=True),
    "seed": _at_least(0, integer=True),
    "context_parallel_size": _at_least(1, integer=True),
    "mixture_seed": (lambda v: _is(v, int), "must be an integer"),
    "min_chars": _at_least(0, integer=True),
    "max_chars": _OPTIONAL_POSITIVE_INT,
    "max_malformed_fraction": _fraction(upper_open=False),
    "eval_fraction": _fraction(upper_open=True),
    "other_languages_weight": _at_least(0),
    "lora_r": _at_least(1, integer=True),
}
CHOICES = {"chat_template": ("auto", "falcon_h1", "tokenizer"), "truncation_mode": ("keep_start", "keep_end")}
# every policy loss TRL 1.16's GRPOTrainer implements, by the name its `loss_type` takes
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "luspo", "cispo", "sapo", "vespo")
# where a trainer's config reads a name differently: GRPO's beta 0 means no KL term (DPO's needs beta > 0)
RANGES_OF = {
    "GRPOConfig": {
        "beta": _at_least(0),
        "num_generations": _at_least(2, integer=True),
        "max_completion_length": _at_least(1, integer=True),
        "temperature": _at_least(0, strict=True),
        "epsilon": _at_least(0),
    },
    "GRPOArguments": {"overlong_buffer": _at_least(0, integer=True)},
}
CHOICES_OF = {"GRPOConfig": {"loss_type": GRPO_LOSS_TYPES}}


def range_problems(config) -> list[tuple[str, str]]:
    """(field, problem) for every ranged or enumerated field of a config object that is out of bounds."""
    problems = []
    kind = type(config).__name__
    for name, (ok, rule) in {**RANGES, **RANGES_OF.get(kind, {})}.items():
        if hasattr(config, name) and not ok(getattr(config, name)):
            problems.append((name, f"{rule}, got {shown(getattr(config, name))}"))
    for name, choices in {**CHOICES, **CHOICES_OF.get(kind, {})}.items():
        if hasattr(config, name) and getattr(config, name) not in choices:
            problems.append((name, f"must be one of {', '.join(choices)}; got {shown(getattr(config, name))}"))
    return problems


def check_values(*configs) -> None:
    """Types of falcon-align's own arguments and the ranges of everything a recipe sets, first problem raised."""
    for config in configs:
        if type(config).__module__.startswith("align."):
            check_types(config)
        for field, problem in range_problems(config):
            raise InputError(problem, field)
        if getattr(config, "language_weights", None):
            for language, weight in config.language_weights.items():
                if not _at_least(0)[0](weight):
                    raise InputError(f"must be a number ≥ 0, got {shown(weight)}", f"language_weights.{language}")


# ---------------------------------------------------------------------------------------------- paths
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def looks_local(path: str) -> bool:
    """Whether a name that does not exist was meant as a local path rather than a hub id (`org/name`)."""
    p = Path(path)
    if p.is_absolute() or path.startswith((".", "~")) or p.suffix in DATA_SUFFIXES or path.count("/") != 1:
        return True
    return Path(p.parts[0]).is_dir()  # runs/base, data/x: their first folder is here


def check_checkpoint_path(path, field: str) -> None:
    """A model or tokenizer given as a local folder must exist and hold a config; hub ids pass."""
    path = str(path)
    local = Path(path).expanduser()
    if local.is_dir():
        names = ("config.json", "adapter_config.json", "tokenizer_config.json", "tokenizer.json")
        if not any((local / name).is_file() for name in names):
            raise InputError(f"{path}: the folder holds no config.json, so it is not a checkpoint", field)
        return
    if local.exists():
        raise InputError(f"{path}: expected a checkpoint folder, got a file", field)
    if looks_local(path):
        raise InputError(f"{path}: no such checkpoint folder (nor a hub id of the form org/name)", field)


# ---------------------------------------------------------------------------------------------- recipes
class _LineLoader(yaml.SafeLoader):
    pass


def _mapping_with_lines(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise InputError(
                f"key {key!r} appears twice (lines {seen[key]} and {key_node.start_mark.line + 1}); the second "
                "would silently win",
                file=loader.name,
                line=key_node.start_mark.line + 1,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_lines)


def _lines(node, path="") -> dict[str, int]:
    """{field path ("sources[1].weight"): 1-based line} for every value of a composed YAML document."""
    lines = {path: node.start_mark.line + 1} if path else {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = f"{path}.{key.value}" if path else str(key.value)
            lines[sub] = key.start_mark.line + 1
            lines.update({k: v for k, v in _lines(value, sub).items() if k != sub})
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_lines(item, f"{path}[{i}]"))
    return lines


@dataclasses.dataclass
class Recipe:
    """Where a recipe's values were written: the YAML file and its lines, and the command-line flags."""

    path: str | None = None
    values: dict = dataclasses.field(default_factory=dict)
    lines: dict = dataclasses.field(default_factory=dict)
    flags: set = dataclasses.field(default_factory=set)

    @classmethod
    def read(cls, argv: list[str]) -> Recipe:
        flags = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
        if "--config" not in argv:
            return cls(flags=flags)
        path = argv[argv.index("--config") + 1]
        if not Path(path).is_file():
            raise InputError(f"{path}: no such recipe file", "--config")
        text = Path(path).read_text(encoding="utf-8")
        loader = _LineLoader(text)
        loader.name = path
        try:
            values = loader.get_single_data()
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            problem = f"not valid YAML ({getattr(err, 'problem', err)})"
            raise InputError(problem, file=path, line=mark and mark.line + 1) from None
        finally:
            loader.dispose()
        if not isinstance(values, dict):
            raise InputError(f"a recipe is a mapping of settings, got {shown(values)}", file=path)
        return cls(path, values, _lines(yaml.compose(text, Loader=yaml.SafeLoader)), flags - {"config"})

    def locate(self, err: InputError) -> InputError:
        """The error with the file and line its field was written at (a command-line flag wins over the file)."""
        if err.file or not err.field:
            return err
        root = err.field.split(".")[0].split("[")[0]
        if root in self.flags or self.path is None or root not in self.values:
            return InputError(err.problem, f"--{err.field}" if root in self.flags else err.field)
        line = self.lines.get(err.field) or self.lines.get(root)
        return InputError(err.problem, err.field, self.path, line)

    def check_keys(self, known: list[str]) -> None:
        for key in self.values:
            if key not in known and key != "env":
                raise InputError(f"unknown key{_nearest(key, known)}", str(key), self.path, self.lines.get(str(key)))


class RecipeParser(TrlParser):
    """TRL's parser (YAML recipe, flags over it, unknown keys an error) whose errors name the recipe's file, line
    and field, and which checks every value's type and range before anything loads."""

    def parse_args_and_config(self, args=None, **kwargs):
        argv = list(args) if args is not None else sys.argv[1:]
        recipe = Recipe.read(argv)
        recipe.check_keys([f.name for cls in self.dataclass_types for f in dataclasses.fields(cls)])
        try:
            parsed = super().parse_args_and_config(argv, **kwargs)
            check_values(*parsed)
        except InputError as err:
            raise recipe.locate(err) from None
        return parsed
