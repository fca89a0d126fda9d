"""Hybrid cache: per layer, the attention KV plus the Mamba conv window and SSM state.

Unlike transformers' hybrid cache, the SSM state is kept in fp32 whatever the model dtype, and a
multi-token forward on a non-empty cache continues both recurrent states (chunked prefill, continuing a
conversation) instead of restarting them.
"""

from __future__ import annotations

import torch


class FalconH1HybridCache:
    is_compileable = False
    is_sliding = False

    def __init__(self, config, batch_size: int):
        self.num_layers = config.num_hidden_layers
        self.batch_size = batch_size
        self.key_cache: list[torch.Tensor | None] = [None] * self.num_layers  # (b, kv_heads, T, head_dim)
        self.value_cache: list[torch.Tensor | None] = [None] * self.num_layers
        self.conv_states: list[torch.Tensor | None] = [None] * self.num_layers  # (b, conv_dim, K-1) raw inputs
        self.ssm_states: list[torch.Tensor | None] = [None] * self.num_layers  # (b, H, P, N) fp32
        self.seen_tokens = 0  # positions processed so far, padding included

    # ------------------------------------------------------------------ queries generate() makes
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_croppable(self) -> bool:
        return False

    def has_state(self, layer_idx: int) -> bool:
        return self.ssm_states[layer_idx] is not None

    def __len__(self) -> int:
        return self.num_layers

    # ------------------------------------------------------------------ updates
    def update_kv(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        if self.key_cache[layer_idx] is None:
            self.key_cache[layer_idx], self.value_cache[layer_idx] = key, value
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key], dim=2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value], dim=2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def set_mamba_states(self, layer_idx: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        self.conv_states[layer_idx] = conv_state
        self.ssm_states[layer_idx] = ssm_state.float()

    def advance(self, n_tokens: int) -> None:
        self.seen_tokens += n_tokens

    # ------------------------------------------------------------------ batch edits (beam search, contrastive)
    def _apply(self, fn) -> None:
        for store in (self.key_cache, self.value_cache, self.conv_states, self.ssm_states):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = fn(t)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))
        self.batch_size *= repeats

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent (SSM) state cannot be rolled back; re-run the prefix instead")


class StaticHybridCache(FalconH1HybridCache):
    """The hybrid cache with every buffer allocated once, at a fixed address, for `max_len` positions: attention KV
    (b, kv_heads, max_len, head_dim), conv window (b, conv_dim, K-1), fp32 SSM state (b, H, P, N), and `valid`
    (b, max_len), the key positions that hold real tokens (left padding is not). A decode step then has fixed
    shapes and addresses, so `model/decode.py` can capture the model's own forward in a CUDA graph once and replay it
    per token. The prompt is prefilled by the same forward into the buffers; `reset` readies the cache for reuse."""

    def __init__(self, config, batch_size: int, max_len: int, device, dtype: torch.dtype):
        super().__init__(config, batch_size)
        self.max_len = max_len
        b, kv, hd = batch_size, config.num_key_value_heads, config.head_dim
        zeros = lambda *shape, dtype=dtype: torch.zeros(*shape, device=device, dtype=dtype)
        L = self.num_layers
        self.key_cache = [zeros(b, kv, max_len, hd) for _ in range(L)]
        self.value_cache = [zeros(b, kv, max_len, hd) for _ in range(L)]
        self.conv_states = [zeros(b, config.conv_dim, config.mamba_d_conv - 1) for _ in range(L)]
        H, P, N = config.mamba_n_heads, config.mamba_d_head, config.mamba_d_state
        self.ssm_states = [zeros(b, H, P, N, dtype=torch.float32) for _ in range(L)]
        self.valid = zeros(b, max_len, dtype=torch.bool)
        self.slot = zeros((), dtype=torch.long)  # the next position written, on the device (advanced in graphs too)
        self.key_positions = torch.arange(max_len, device=device)
        self._filled = [False] * L  # python: which layers hold a state (prefill fills them one by one)
        self.decoder = None  # model/decode.py: the captured step over these buffers

    def reset(self) -> StaticHybridCache:
        """Empty, for the next generation: states zeroed, no valid key (stale keys are masked out)."""
        for t in self.conv_states + self.ssm_states:
            t.zero_()
        self.valid.zero_()
        self.slot.zero_()
        self.seen_tokens = 0
        self._filled = [False] * self.num_layers
        return self

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def has_state(self, layer_idx: int) -> bool:
        return self._filled[layer_idx]

    def attention_mask(self, q_len: int, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Records the new positions' validity and → the mask the forward's attention uses. On an empty cache (the
        prefill) None: keys are the prompt's own, and the forward's usual causal/padding mask applies. Later: boolean
        (b, 1, q_len, max_len), the valid keys up to each query's position. Called once per forward, before the
        layers, with `attention_mask` (b, seen + q_len) or None."""
        if self.seen_tokens == 0:
            if q_len > self.max_len:
                raise ValueError(f"a prompt of {q_len} tokens does not fit a static cache of {self.max_len}")
            new = attention_mask[:, -q_len:].bool() if attention_mask is not None else True
            self.valid[:, :q_len] = new
            return None
        queries = self.slot + torch.arange(q_len, device=self.slot.device)  # (q,) absolute positions
        self.valid |= (self.key_positions >= self.slot) & (self.key_positions <= queries[-1])  # new tokens are real
        causal = self.key_positions[None, :] <= queries[:, None]  # (q, max_len)
        return self.valid[:, None, None, :] & causal[None, None]

    def update_kv(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        """key, value (b, kv, l, hd) written at the cache's next positions. → the prompt's own keys on an empty cache
        (plain causal attention), else the whole buffers, which `attention_mask` masks."""
        l = key.size(2)
        if self.seen_tokens == 0:
            self.key_cache[layer_idx][:, :, :l].copy_(key)
            self.value_cache[layer_idx][:, :, :l].copy_(value)
            return key, value
        at = self.slot + torch.arange(l, device=self.slot.device)  # a tensor index: the same kernel every step
        self.key_cache[layer_idx].index_copy_(2, at, key)
        self.value_cache[layer_idx].index_copy_(2, at, value)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def set_mamba_states(self, layer_idx: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        self.conv_states[layer_idx].copy_(conv_state)
        self.ssm_states[layer_idx].copy_(ssm_state)
        self._filled[layer_idx] = True

    def advance(self, n_tokens: int) -> None:
        if self.seen_tokens + n_tokens > self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} positions; {self.seen_tokens + n_tokens} asked")
        self.seen_tokens += n_tokens
        self.slot.add_(n_tokens)

    def _apply(self, fn) -> None:
        raise NotImplementedError("a static cache keeps its batch; beam search and batch edits use the dynamic cache")
