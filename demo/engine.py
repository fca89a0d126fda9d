"""Loading a checkpoint once and streaming replies from it, the way each kind of model should be prompted.

Instruct models get the conversation through their chat template (history and optional system prompt);
Base models get the same conversation as plain text to continue ("User: …\nAssistant:"), stopped at the next
"User:" line. Generation runs in a thread and streams text through a queue; a stop event ends it early.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    StoppingCriteria,
    TextIteratorStreamer,
)

from model import FalconH1ForCausalLM
from model.decode import sample


@dataclass
class Settings:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    system_prompt: str = ""


class CountingStreamer(TextIteratorStreamer):
    """TextIteratorStreamer that also counts the generated tokens it receives (the prompt excluded), so the pane's
    tokens/s counts what the model produced, not what its text re-tokenizes to."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated = 0

    def put(self, value):
        counts = not (self.skip_prompt and self.next_tokens_are_prompt)  # the first put is the prompt
        super().put(value)
        if counts:
            self.generated += value.shape[-1]


class PromptError(ValueError):
    """Input the demo refuses, with a message for the user."""


def clean_prompt(text: str | None, max_chars: int) -> tuple[str, str | None]:
    """→ (prompt, notice). Removes control and other unprintable characters (keeping newlines and tabs);
    raises PromptError for an empty or over-long prompt."""
    text = text or ""
    kept = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    notice = None
    if len(kept) != len(text):
        notice = f"removed {len(text) - len(kept)} unprintable character(s) from the prompt"
    kept = kept.strip()
    if not kept:
        raise PromptError("The prompt is empty" + (" after removing unprintable characters." if notice else "."))
    if len(kept) > max_chars:
        raise PromptError(f"The prompt has {len(kept):,} characters; the limit is {max_chars:,}. Please shorten it.")
    return kept, notice


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 on CPU is slow and lossy
    return getattr(torch, dtype)


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return self.event.is_set()


class _SeededSampler(LogitsProcessor):
    """Temperature / top-p sampling from a per-request generator, so a seed reproduces an answer even while
    the other pane samples concurrently (torch's global RNG is shared between threads). Greedy decoding then
    picks the one token left."""

    def __init__(self, temperature: float, top_p: float, seed: int, device):
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, input_ids, scores):
        token = sample(scores.float(), self.temperature, self.top_p, self.generator)
        return torch.full_like(scores, -float("inf")).scatter_(1, token[:, None], 0.0)


class ChatModel:
    """One checkpoint, loaded once. `chat=True` prompts through the chat template, else plain continuation."""

    def __init__(self, path: str, chat: bool, device="auto", dtype="auto", trust_remote_code=False):
        self.path, self.chat = str(path), chat
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        cls = FalconH1ForCausalLM if config.model_type == "falcon_h1" else AutoModelForCausalLM
        self.model = cls.from_pretrained(self.path, dtype=self.dtype).to(self.device).eval()
        if chat and not self.tokenizer.chat_template:
            raise ValueError(f"{self.path}: the Instruct model's tokenizer has no chat template")
        self.lock = threading.Lock()  # one generation at a time per model; the queue bounds concurrency

    @property
    def name(self) -> str:
        return Path(self.path).name or self.path

    def render(self, history: list[dict], prompt: str, settings: Settings) -> str:
        """The exact text the model sees. history: [{"role", "content"}, ...] of earlier turns."""
        messages = list(history) + [{"role": "user", "content": prompt}]
        if self.chat:
            if settings.system_prompt.strip():
                messages = [{"role": "system", "content": settings.system_prompt.strip()}] + messages
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        lines = [settings.system_prompt.strip()] if settings.system_prompt.strip() else []
        for m in messages:
            lines.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}")
        return "\n".join(lines) + "\nAssistant:"

    def count_tokens(self, text: str) -> int:
        """Tokens of a rendered prompt, as `stream` will encode it."""
        return len(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def stream(self, history, prompt, settings: Settings, stop: threading.Event):
        """Yields (text_so_far, stats) while generating; stats = {"tokens", "seconds", "tokens_per_s"}."""
        text = self.render(history, prompt, settings)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=not self.chat).to(self.device)
        streamer = CountingStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        eos = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        eos = [i for i in eos if i is not None and i != self.tokenizer.unk_token_id]
        kwargs = dict(
            **enc,
            streamer=streamer,
            max_new_tokens=int(settings.max_new_tokens),
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=[_StopOnEvent(stop)],
            do_sample=False,  # sampling, when asked, happens in _SeededSampler with the request's own generator
        )
        if settings.temperature > 0:
            sampler = _SeededSampler(
                float(settings.temperature), float(settings.top_p), int(settings.seed), self.device
            )
            kwargs["logits_processor"] = [sampler]
        if not self.chat:
            kwargs.update(stop_strings=["\nUser:"], tokenizer=self.tokenizer)
        errors = []

        def work():
            try:
                with self.lock:
                    with torch.no_grad():
                        self.model.generate(**kwargs)
            except Exception as err:  # surfaced in the pane by the caller
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        t0 = time.perf_counter()
        thread.start()
        out = ""
        for piece in streamer:
            out += piece
            yield self._trim(out), self._stats(streamer.generated, t0)
        thread.join()
        if errors:
            raise errors[0]
        yield self._trim(out), self._stats(streamer.generated, t0)

    def _trim(self, text: str) -> str:
        return text.split("\nUser:")[0].strip() if not self.chat else text.strip()

    @staticmethod
    def _stats(n: int, t0: float) -> dict:
        dt = max(time.perf_counter() - t0, 1e-6)
        return {"tokens": n, "seconds": round(dt, 2), "tokens_per_s": round(n / dt, 1)}
