"""Verifiable rewards for GRPO: pure functions with TRL's reward-function signature, chosen by name in a recipe.

TRL calls each reward with `prompts`, `completions` (message lists for conversational data, else text),
`completion_ids` and every dataset column as a list (here `answer` and `language`), and wants one float per
completion (None: not scorable by this reward). Names a recipe can use:

- `exact_answer`: 1.0 when the completion's final answer equals the reference answer, numerically (17 = 17.0 =
  34/2, thousands separators ignored) or as normalised text (case, spaces, surrounding punctuation), else 0.0.
  The final answer is the last `\\boxed{...}` if any, else the last non-empty line (an "Answer:" prefix dropped).
- `answer_format`: 1.0 when the completion states its answer where `exact_answer` looks for it: one `\\boxed{}`
  with content, or a short final line (≤ 40 characters); else 0.0.
- `language_consistency`: the share of the reply's letters written in the script of the prompt's language (the
  `language` column, else the prompt's own dominant script); 1.0 for a reply with no letters (a bare number).
  Scripts tell apart Latin, Cyrillic, Arabic (ar, ur), Devanagari, Han, Kana and Hangul; languages that share a
  script (en/fr/de, ...) are not told apart.
- `length_penalty`: DAPO's soft over-long punishment: 0 up to `max_completion_length − buffer` tokens, then
  falling linearly to −1 at `max_completion_length`.

A user reward is named by import path, "package.module:function", with the same signature.
"""

from __future__ import annotations

import functools
import importlib
import re
import unicodedata
from fractions import Fraction

FINAL_LINE_CHARS = 40  # a final answer line longer than this is prose, not an answer


# ---------------------------------------------------------------------------------------------- text helpers
def completion_text(completion) -> str:
    """A completion as TRL passes it (text, or a list of messages) → its text."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


def boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` in `text`, braces balanced (\\boxed{\\frac{1}{2}} → "\\frac{1}{2}")."""
    found, start = [], 0
    while (at := text.find("\\boxed{", start)) >= 0:
        depth, i = 1, at + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:  # unbalanced: no answer in it
            break
        found.append(text[at + len("\\boxed{") : i - 1])
        start = i
    return found


_PREFIX = re.compile(r"^\s*(final answer|the answer is|answer)\s*[:：]?\s*", re.IGNORECASE)


def final_answer(text: str) -> str | None:
    """The answer a completion gives: its last `\\boxed{}`, else its last non-empty line; None when empty."""
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return _PREFIX.sub("", lines[-1]).strip() if lines else None


def reference_answer(text: str) -> str:
    """A dataset's answer field → the answer itself: GSM8K's solutions end in "#### 72"; MATH-style ones box it."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    boxed = boxed_contents(text)
    return boxed[-1].strip() if boxed else text.strip()


_FRACTION = re.compile(r"^\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")


def as_number(text: str) -> Fraction | None:
    """ "1,234" → 1234, "-0.50" → -1/2, "3/4" and "\\frac{3}{4}" → 3/4, "$12$" → 12, "50%" → 50; else None."""
    t = text.strip().strip("$").strip().rstrip(".").replace("\\!", "").replace("\\,", "")
    t = t.replace("−", "-").rstrip("%").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    if m := _FRACTION.match(t):
        t = f"{m.group(1)}/{m.group(2)}"
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)(/-?\d+(\.\d*)?)?", t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def normalise_text(text: str) -> str:
    """Case-folded, NFKC, inner whitespace collapsed, surrounding punctuation and `$` dropped."""
    t = unicodedata.normalize("NFKC", text).casefold().strip().strip("$").strip()
    t = re.sub(r"\s+", " ", t)
    return t.strip(" .,;:!?。、\"'`()[]")


def answers_match(given: str | None, reference: str) -> bool:
    if given is None:
        return False
    a, b = as_number(given), as_number(reference)
    if a is not None and b is not None:
        return a == b
    return normalise_text(given) == normalise_text(reference)


# ---------------------------------------------------------------------------------------------- scripts
SCRIPT_OF_LANGUAGE = {
    "ar": "arabic",
    "ur": "arabic",
    "fa": "arabic",
    "hi": "devanagari",
    "zh": "han",
    "ja": "japanese",  # kana with han
    "ko": "hangul",
    "ru": "cyrillic",
    "uk": "cyrillic",
    "bg": "cyrillic",
}


def letter_script(ch: str) -> str | None:
    """The script of a letter (None for digits, punctuation, spaces)."""
    if not ch.isalpha():
        return None
    code = ord(ch)
    if 0x0600 <= code <= 0x06FF or 0x0750 <= code <= 0x077F or 0xFB50 <= code <= 0xFEFF:
        return "arabic"
    if 0x0900 <= code <= 0x097F:
        return "devanagari"
    if 0x0400 <= code <= 0x052F:
        return "cyrillic"
    if 0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF:
        return "kana"
    if 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
        return "hangul"
    if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF:
        return "han"
    if code < 0x0250 or 0x1E00 <= code <= 0x1EFF:
        return "latin"
    return "other"


def _script_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ch in text:
        script = letter_script(ch)
        if script:
            counts[script] = counts.get(script, 0) + 1
    return counts


def _accepts(expected: str) -> set[str]:
    return {"japanese": {"kana", "han"}}.get(expected, {expected})


def expected_script(language: str | None, prompt_text: str) -> str | None:
    if language:
        return SCRIPT_OF_LANGUAGE.get(language.split("-")[0].lower(), "latin")
    counts = _script_counts(prompt_text)
    if not counts:
        return None
    top = max(counts, key=counts.get)
    return "japanese" if top == "kana" else top


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return " ".join(m.get("content") or "" for m in prompt if m.get("role") == "user")


# ---------------------------------------------------------------------------------------------- rewards
def exact_answer(completions, answer, **kwargs) -> list[float]:
    pairs = zip(completions, answer)
    return [float(answers_match(final_answer(completion_text(c)), reference_answer(str(a)))) for c, a in pairs]


def answer_format(completions, **kwargs) -> list[float]:
    scores = []
    for c in completions:
        text = completion_text(c)
        boxed = boxed_contents(text)
        if boxed:
            scores.append(float(len(boxed) == 1 and bool(boxed[0].strip())))
            continue
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        scores.append(float(bool(lines) and len(lines[-1]) <= FINAL_LINE_CHARS))
    return scores


def language_consistency(prompts, completions, language=None, **kwargs) -> list[float | None]:
    languages = language if language is not None else [None] * len(completions)
    scores = []
    for prompt, completion, lang in zip(prompts, completions, languages):
        expected = expected_script(lang, _prompt_text(prompt))
        counts = _script_counts(completion_text(completion))
        total = sum(counts.values())
        if expected is None:
            scores.append(None)
        elif not total:
            scores.append(1.0)
        else:
            scores.append(sum(counts.get(s, 0) for s in _accepts(expected)) / total)
    return scores


def length_penalty(completion_ids, max_completion_length: int, buffer: int, **kwargs) -> list[float]:
    """DAPO's soft over-long punishment over token counts (needs the two lengths bound: see `resolve`)."""
    start = max_completion_length - buffer
    return [-min(1.0, max(0, len(ids) - start) / max(buffer, 1)) for ids in completion_ids]


BUILT_IN = {
    "exact_answer": exact_answer,
    "answer_format": answer_format,
    "language_consistency": language_consistency,
    "length_penalty": length_penalty,
}


def resolve(names, max_completion_length: int, overlong_buffer: int) -> list:
    """Reward names from a recipe → callables (TRL logs each under its __name__). A name is a built-in or an import
    path "package.module:function"; anything else is an error naming it."""
    if not names:
        raise ValueError(f"reward_funcs: name at least one reward ({', '.join(BUILT_IN)} or 'package.module:fn')")
    funcs = []
    for name in names:
        if name in BUILT_IN:
            fn = BUILT_IN[name]
            if name == "length_penalty":
                buffer = min(overlong_buffer, max_completion_length)
                fn = functools.update_wrapper(
                    functools.partial(fn, max_completion_length=max_completion_length, buffer=buffer), fn
                )
        elif ":" in name:
            module, _, attr = name.partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"reward_funcs: cannot import {name!r} ({type(err).__name__}: {err})") from None
            if not callable(fn):
                raise ValueError(f"reward_funcs: {name!r} is not callable")
        else:
            raise ValueError(
                f"reward_funcs: unknown reward {name!r}; built-in: {', '.join(BUILT_IN)}; or 'package.module:function'"
            )
        funcs.append(fn)
    return funcs
