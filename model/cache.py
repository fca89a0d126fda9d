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
