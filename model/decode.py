"""Fast decoding: the model's own forward over a static hybrid cache, captured in a CUDA graph, replayed per token.

Eager decoding of a 36-layer hybrid launches ~1,000 small kernels per token from Python, and at small batches the GPU
mostly waits. `StaticHybridCache` (model/cache.py) gives every buffer a fixed address and shape, so one decode step —
`FalconH1ForCausalLM.forward` on one token per row: embedding, every layer's attention over the static KV, conv and
SSM state updates, MLP, final norm, lm_head — is captured once (optionally compiled first, so inductor fuses the
elementwise glue) and replayed for each new token. There is no second implementation of the layer: what is captured
is the forward that prefill, training and the eager path run.

`FalconH1ForCausalLM.generate` takes this path on CUDA by default (`DecodeSettings`), under transformers' own
generation loop, so greedy and sampled decoding, logits processors, stopping criteria, stop strings and streamers
all apply. Beam search, several sequences per prompt and CPU runs use the eager path with the dynamic cache.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .cache import StaticHybridCache

logger = logging.getLogger("falcon_align.decode")


@dataclass
class DecodeSettings:
    """How `generate` decodes. static_cache None: on CUDA. graphs: capture the step in a CUDA graph (CUDA only).
    compile: torch.compile the step before capture (fuses norms, RoPE, multipliers and gates: ~2× fewer kernels per
    token; the first generation of a new shape pays the compile). length_multiple: static caches are sized to a
    multiple of it, so prompts of nearby lengths share one cache and one graph. keep: static caches (each with its
    graph) kept per model for reuse."""

    static_cache: bool | None = None
    graphs: bool = True
    compile: bool = True
    length_multiple: int = 256
    keep: int = 2


class DecodeGraph:
    """One decode step of `model` over `cache`, captured on first use. Inputs are copied into fixed buffers, the graph
    replays, and the logits (b, 1, vocab) come back as a fresh tensor."""

    def __init__(self, cache: StaticHybridCache, compile: bool):
        self.cache = cache
        device = cache.slot.device
        self.token = torch.zeros(cache.batch_size, 1, device=device, dtype=torch.long)
        self.position = torch.zeros(cache.batch_size, 1, device=device, dtype=torch.long)
        self.graph = None
        self.logits = None
        self.capturing = False
        self.step = torch.compile(self._forward, dynamic=False) if compile else self._forward

    def _forward(self, model):
        out = model(input_ids=self.token, position_ids=self.position, past_key_values=self.cache, logits_to_keep=1)
        return out.logits

    def __call__(self, model, input_ids, position_ids) -> torch.Tensor:
        cache = self.cache
        if cache.seen_tokens >= cache.max_len:
            raise ValueError(f"the static cache holds {cache.max_len} positions, all used")
        self.token.copy_(input_ids)
        self.position.copy_(position_ids)
        if self.graph is None:
            self._capture(model)
        self.graph.replay()
        cache.seen_tokens += 1  # the graph advanced `slot` on the device
        return self.logits.clone()

    def _capture(self, model):
        """Warm-up (Triton autotuning, compilation, the allocator's pool) on a side stream, then the capture. Both run
        the step for real, so the states, validity, position and token count are put back after each run."""
        cache = self.cache
        buffers = cache.conv_states + cache.ssm_states + [cache.valid, cache.slot]
        saved, seen = [t.clone() for t in buffers], cache.seen_tokens

        def restore():
            for t, s in zip(buffers, saved):
                t.copy_(s)
            cache.seen_tokens = seen

        self.capturing = True
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.step(model)
                    restore()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread (the demo's other pane) may run its own model meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.logits = self.step(model)
            restore()
            self.graph = graph
        finally:
            self.capturing = False


def replayable(cache, input_ids, labels) -> bool:
    """Whether a forward is a decode step the cache's captured graph serves."""
    return (
        isinstance(cache, StaticHybridCache)
        and cache.decoder is not None
        and not cache.decoder.capturing
        and labels is None
        and input_ids is not None
        and input_ids.size(1) == 1
        and cache.seen_tokens > 0
    )


class StaticCaches:
    """A model's static caches, kept for reuse (capturing a graph costs far more than a step), keyed by everything
    the captured step depends on: batch, length, device, dtype, the weights' addresses (a moved or reloaded model
    gets a new graph) and the adapters' switches (PEFT's disable_adapter flips Python flags a graph cannot see)."""

    def __init__(self):
        self._caches: OrderedDict = OrderedDict()

    def get(self, model, batch: int, max_len: int, settings: DecodeSettings) -> StaticHybridCache:
        p = next(model.parameters())
        adapters = tuple(  # PEFT's tuner layers: a bool switch and their active adapters' names
            (m.disable_adapters, tuple(m.active_adapters))
            for m in model.modules()
            if isinstance(getattr(m, "disable_adapters", None), bool)
        )
        weights = tuple(t.data_ptr() for t in model.parameters())
        key = (batch, max_len, p.device, p.dtype, hash(weights), adapters, settings.graphs, settings.compile)
        cache = self._caches.pop(key, None)
        if cache is None:
            while len(self._caches) >= max(settings.keep, 1):
                self._caches.popitem(last=False)
            cache = StaticHybridCache(model.config, batch, max_len, p.device, p.dtype)
            if settings.graphs and p.device.type == "cuda":
                cache.decoder = DecodeGraph(cache, compile=settings.compile)
        self._caches[key] = cache
        return cache.reset()

    def clear(self) -> None:
        self._caches.clear()


def static_cache_for(model, settings: DecodeSettings, input_ids, generation_config, kwargs) -> tuple[object, str]:
    """→ (a static cache for this `generate` call, or None; why). The static path serves one sequence per prompt,
    sampled or greedy, from token ids, on CUDA unless `settings.static_cache` says otherwise."""
    gen = generation_config or model.generation_config
    get = lambda name: kwargs.get(name, getattr(gen, name, None))
    wanted = settings.static_cache if settings.static_cache is not None else model.device.type == "cuda"
    reasons = [
        (not wanted, "static cache off (DecodeSettings.static_cache)" if settings.static_cache is False else "on CPU"),
        (input_ids is None, "no input_ids"),
        (kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None, "a cache was passed"),
        ((get("num_beams") or 1) > 1, "beam search"),
        ((get("num_return_sequences") or 1) > 1, "several sequences per prompt"),
        (kwargs.get("assistant_model") is not None, "assisted decoding"),
        (get("use_cache") is False, "use_cache=False"),
    ]
    why = next((reason for failed, reason in reasons if failed), None)
    if why:
        return None, why
    n = input_ids.shape[1]
    new = get("max_new_tokens")
    total = n + new if new is not None else max(get("max_length") or 0, n + 1)
    max_len = -(-total // settings.length_multiple) * settings.length_multiple
    cache = model._static_caches.get(model, input_ids.shape[0], max_len, settings)
    how = "CUDA graph" + (", compiled" if settings.compile else "") if cache.decoder is not None else "eager"
    return cache, f"static cache ({max_len} positions), {how}"


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """logits (b, vocab) fp32 → (b,) next tokens; greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
