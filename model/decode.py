"""Fast decoding: a static hybrid cache and one decode step captured in a CUDA graph.

Eager decoding of a 36-layer hybrid launches ~1,000 small kernels per token from Python; at batch 1 the GPU
mostly waits. Here every buffer has a fixed address and shape (KV for `max_len` positions, conv window,
fp32 SSM state), so a whole decode step — embedding, 36 × (attention over the static KV with a validity
mask, conv update, SSM state update, MLP), final norm, lm_head — is captured once and replayed per token.
The prompt is prefilled by the ordinary forward (same kernels as training) and copied into the buffers.

    gen = StaticDecoder(model, batch_size=1, max_len=1024)
    tokens = gen.generate(input_ids, attention_mask, max_new_tokens=256)   # greedy, or temperature/top_p

The eager path (`model.generate`) stays the reference: tests check both give the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import FalconH1HybridCache
from .kernels import get_ops
from .modeling import _rope_cos_sin, _rotate_half
from .packing import positions_from_attention_mask


class StaticDecoder:
    def __init__(self, model, batch_size: int, max_len: int, use_graph: bool = True, compile: bool = False):
        self.model = model.eval()
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.b, self.max_len = batch_size, max_len
        L, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        k1 = cfg.mamba_d_conv - 1
        new = lambda *shape, dtype=self.dtype: torch.zeros(*shape, device=self.device, dtype=dtype)
        self.k = [new(batch_size, kv, max_len, hd) for _ in range(L)]
        self.v = [new(batch_size, kv, max_len, hd) for _ in range(L)]
        self.conv = [new(batch_size, cfg.conv_dim, k1) for _ in range(L)]
        self.ssm = [
            new(batch_size, cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state, dtype=torch.float32)
            for _ in range(L)
        ]
        self.valid = new(batch_size, max_len, dtype=torch.bool)  # key positions holding real tokens
        # step inputs (fixed addresses)
        self.token = torch.zeros(batch_size, 1, device=self.device, dtype=torch.long)
        self.position = torch.zeros(batch_size, 1, device=self.device, dtype=torch.long)  # RoPE position
        self.slot = torch.zeros((), device=self.device, dtype=torch.long)  # cache index written this step
        self.key_positions = torch.arange(max_len, device=self.device)
        self.ops = get_ops(self.device)
        self.use_graph = use_graph and self.device.type == "cuda"
        self.graph = None
        self.logits = None
        # optional: let inductor fuse the step's elementwise glue before the graph is captured
        self._step_fn = torch.compile(self._step, dynamic=False) if compile else self._step

    # ------------------------------------------------------------------ one step, static shapes
    @torch.no_grad()
    def _step(self):
        m = self.model.model
        cfg = self.model.config
        ops = self.ops
        b = self.b
        self.valid |= self.key_positions == self.slot  # the new token is attended to from now on
        attn_mask = self.valid[:, None, None, :]  # (b, 1, 1, max_len)
        x = m.embed_tokens(self.token) * cfg.embedding_multiplier  # (b, 1, d)
        cos, sin = _rope_cos_sin(self.position, cfg.head_dim, cfg.rope_theta_value, x.dtype)
        for i, layer in enumerate(m.layers):
            h = layer.input_layernorm(x)
            # --- Mamba: conv window shift + one recurrence step
            mix = layer.mamba
            zxbcdt = mix.in_proj(h * mix.ssm_in_multiplier) * mix.mup_vector
            z, xBC, dt = zxbcdt.split([mix.d_ssm, mix.conv_dim, mix.n_heads], dim=-1)
            xBC = ops.causal_conv1d_update(
                xBC[:, 0], self.conv[i], mix.conv1d.weight.squeeze(1), mix.conv1d.bias, activation="silu"
            )
            xs, B, C = xBC.split([mix.d_ssm, mix.n_groups * mix.d_state, mix.n_groups * mix.d_state], dim=-1)
            y = ops.selective_state_update(
                self.ssm[i],
                xs.view(b, mix.n_heads, mix.head_dim),
                dt[:, 0],
                -torch.exp(mix.A_log.float()),
                B.view(b, mix.n_groups, -1),
                C.view(b, mix.n_groups, -1),
                D=mix.D,
                dt_bias=mix.dt_bias,
                dt_softplus=True,
            ).view(b, 1, mix.d_ssm)
            y = mix.norm(y, z, ops) if mix.norm is not None else y * F.silu(z)
            m_out = mix.out_proj(y.to(x.dtype)) * layer.ssm_out_multiplier
            # --- attention over the static KV
            att = layer.self_attn
            u = h * layer.attention_in_multiplier
            q = att.q_proj(u).view(b, 1, att.n_heads, att.head_dim).transpose(1, 2)
            k = att.k_proj(u).view(b, 1, att.n_kv, att.head_dim).transpose(1, 2) * att.key_multiplier
            v = att.v_proj(u).view(b, 1, att.n_kv, att.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i].index_copy_(2, self.slot.view(1), k)
            self.v[i].index_copy_(2, self.slot.view(1), v)
            o = F.scaled_dot_product_attention(
                q,
                self.k[i],
                self.v[i],
                attn_mask=attn_mask,
                scale=att.head_dim**-0.5,
                enable_gqa=att.n_kv != att.n_heads,
            )
            a_out = att.o_proj(o.transpose(1, 2).reshape(b, 1, -1)) * layer.attention_out_multiplier
            x = x + (m_out + a_out)
            x = x + layer.feed_forward(layer.pre_ff_layernorm(x))
        x = m.final_layernorm(x)
        return (self.model.lm_head(x[:, -1]) * cfg.lm_head_multiplier).float()  # (b, vocab)

    def _capture(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        saved = [t.clone() for t in self.conv + self.ssm] + [self.valid.clone()]
        with torch.cuda.stream(stream):  # warm-up: Triton autotuning and allocator pools before capture
            for _ in range(3):
                self._step_fn()
        torch.cuda.current_stream().wait_stream(stream)
        for t, s in zip(self.conv + self.ssm + [self.valid], saved):
            t.copy_(s)  # the warm-up steps must not advance the real state
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step_fn()
        for t, s in zip(self.conv + self.ssm + [self.valid], saved):
            t.copy_(s)

    # ------------------------------------------------------------------ prefill + loop
    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None):
        b, n = input_ids.shape
        if b != self.b or n >= self.max_len:
            raise ValueError(f"prompt batch {b} / length {n} does not fit batch_size={self.b}, max_len={self.max_len}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = FalconH1HybridCache(self.model.config, b)
        out = self.model(
            input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        for i in range(len(self.k)):
            self.k[i][:, :, :n].copy_(cache.key_cache[i])
            self.v[i][:, :, :n].copy_(cache.value_cache[i])
            self.conv[i].copy_(cache.conv_states[i])
            self.ssm[i].copy_(cache.ssm_states[i])
        self.valid.zero_()
        self.valid[:, :n] = attention_mask.bool()
        self.slot.fill_(n)
        self.position.copy_(positions_from_attention_mask(attention_mask)[:, -1:] + 1)
        return out.logits[:, -1].float()

    def step(self, token):
        self.token.copy_(token.view(self.b, 1))
        if self.use_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step_fn()
        self.slot += 1
        self.position += 1
        return logits

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        attention_mask=None,
        max_new_tokens=64,
        temperature=0.0,
        top_p=1.0,
        eos_token_id=None,
        generator=None,
    ):
        """Returns (b, prompt + new) token ids. temperature 0 = greedy."""
        n = input_ids.shape[1]
        if n + max_new_tokens > self.max_len:
            raise ValueError(f"prompt {n} + {max_new_tokens} new tokens exceed max_len={self.max_len}")
        logits = self.prefill(input_ids, attention_mask)
        out = [input_ids]
        done = torch.zeros(self.b, dtype=torch.bool, device=self.device)
        eos = (
            torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=self.device)
            if eos_token_id is not None
            else None
        )
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_p, generator)
            if eos is not None:
                token = torch.where(done, eos[0], token)
                done |= torch.isin(token, eos)
            out.append(token[:, None])
            if i + 1 == max_new_tokens or (eos is not None and bool(done.all())):
                break
            logits = self.step(token)
        return torch.cat(out, dim=1)


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
