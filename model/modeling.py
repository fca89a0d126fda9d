"""Falcon-H1: parallel hybrid blocks (GQA attention ‖ Mamba-2 on one normed input) + SwiGLU, with µP multipliers.

Parameter names are transformers' own (`model.layers.{i}.mamba.in_proj`, `self_attn.q_proj`,
`feed_forward.down_proj`, `final_layernorm`, ...), so released checkpoints load strictly and PEFT targets
match. Kernels come from `model.kernels.get_ops` only; this file never probes for packages.

Per layer (spec §3.2):
    h = input_layernorm(x)
    x = x + mamba(h) · ssm_out + self_attn(h · attn_in) · attn_out
    x = x + feed_forward(pre_ff_layernorm(x))
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .acceleration import compiled_block, on_two_streams, one_gemm
from .cache import FalconH1HybridCache, StaticHybridCache
from .checks import check_input_ids
from .config import FalconH1Config
from .decode import DecodeSettings, StaticCaches, replayable, static_cache_for
from .kernels import Ops, get_ops, mixer_streams_wanted
from .loss import TokenMetrics, causal_lm_loss_and_metrics, chunked_causal_lm_loss
from .mixers import (  # noqa: F401  (SCAN_SEGMENT_TOKENS, _rope_cos_sin: imported from here too)
    SCAN_SEGMENT_TOKENS,
    FalconH1Attention,
    FalconH1Mixer,
    FalconH1RMSNorm,
    FalconH1RMSNormGated,
    _rope_cos_sin,
    mup_vector,
)
from .packing import (
    build_attention_mask,
    cu_seqlens_from_seq_idx,
    positions_from_attention_mask,
    resolve_seq_idx,
)
from .settings import settings

# long rows under activation checkpointing: the MLP runs in token chunks of this size, each checkpointed on its own
# (FalconH1Model.mlp_chunk_tokens), so a layer's recompute holds one chunk's (chunk, 2·intermediate) activations
MLP_CHUNK_TOKENS = 16384

logger = logging.getLogger("falcon_align.model")
_LOGGED_PATHS: set = set()  # generate's decode paths already logged

# transformers ≥ 5.24 names the output field `cache`; earlier releases `past_key_values`
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class FalconCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal LM output, and the token metrics of the loss when the forward was asked for them."""

    token_metrics: TokenMetrics | None = None


class FalconH1MLP(nn.Module):
    def __init__(self, config: FalconH1Config):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.gate_multiplier, self.down_multiplier = config.mlp_multipliers

    def forward(self, x, fused: bool = False):
        """fused: gate and up as one GEMM (Ops.fused_projections)."""
        gate_up = one_gemm(x, [self.gate_proj, self.up_proj]) if fused else None
        gate, up = gate_up or (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(up * F.silu(gate * self.gate_multiplier)) * self.down_multiplier


@dataclass
class LayerInputs:
    """What every layer of one forward shares. cos, sin (b, 1, l, head_dim) RoPE tables; attn_mask boolean
    (b, 1, l, keys) or None (plain causal); seq_idx (b, l) int32 document ids of packed rows; packed (cu_seqlens,
    max_len) for varlen attention over them; pad_mask (b, l) 0/1 of padded rows; cache; cp this rank's
    context-parallel step; mlp_chunk: tokens per checkpointed MLP chunk of long rows; fused: projections of one input
    as one GEMM; streams: attention on a side CUDA stream (model/acceleration.py)."""

    cos: torch.Tensor
    sin: torch.Tensor
    ops: Ops
    attn_mask: torch.Tensor | None = None
    seq_idx: torch.Tensor | None = None
    packed: tuple | None = None
    pad_mask: torch.Tensor | None = None
    cache: object = None
    cp: object = None
    mlp_chunk: int | None = None
    fused: bool = False
    streams: bool = False


class FalconH1DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: FalconH1Config, layer_idx: int):
        super().__init__()
        self.feed_forward = FalconH1MLP(config)
        self.mamba = FalconH1Mixer(config, layer_idx)
        self.self_attn = FalconH1Attention(config, layer_idx)
        self.input_layernorm = FalconH1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_ff_layernorm = FalconH1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention_in_multiplier = config.attention_in_multiplier
        self.attention_out_multiplier = config.attention_out_multiplier
        self.ssm_out_multiplier = config.ssm_out_multiplier
        self.compiled = None  # FalconH1ForCausalLM.compile_layers: (backend, dynamic, options) of the compiled block

    def forward(self, hidden_states, inputs: LayerInputs):
        # compiled for training forwards only: a cache's Python state and context parallelism's collectives stay eager
        eager = not self.compiled or inputs.cache is not None or inputs.cp is not None
        block = type(self).block
        if not eager:
            block = compiled_block(block, self.compiled, hidden_states.device.type)
        return block(self, hidden_states, inputs)

    def block(self, hidden_states, inputs: LayerInputs):
        """The layer's arithmetic. `forward` runs it, under HF's activation checkpointing when that is on; a compiled
        copy of this function (one for all layers) is what `compile_layers` switches to, so a checkpointed layer
        recomputes through the compiled code too."""
        h = self.input_layernorm(hidden_states)
        # fused where launches count; not with a cache (decoding is bandwidth-bound: the weights' copy would cost more)
        fused = inputs.fused and inputs.cache is None
        zxbcdt, qkv = self._fused_input_projections(h) if fused else (None, None)
        ssm = partial(self._ssm_branch, h, zxbcdt, inputs)
        attention = partial(self._attention_branch, h, qkv, inputs)
        if self._two_streams(inputs, h):
            m, a = on_two_streams(ssm, attention, h.device)
        else:
            m, a = ssm(), attention()
        hidden_states = hidden_states + (m + a)
        return hidden_states + self._feed_forward(self.pre_ff_layernorm(hidden_states), inputs.mlp_chunk, fused)

    def _two_streams(self, inputs: LayerInputs, h) -> bool:
        """Attention on a side stream (`on_two_streams`)? Where the call asks for it, on CUDA, without a cache (its
        Python state) or context parallelism (collectives), and not in a checkpointed layer: that recomputes inside
        the backward, on whichever stream asked for it."""
        checkpointed = self.gradient_checkpointing and self.training
        return inputs.streams and inputs.cache is None and inputs.cp is None and not checkpointed and h.is_cuda

    def _ssm_branch(self, h, zxbcdt, x: LayerInputs):
        m = self.mamba(h, x.ops, seq_idx=x.seq_idx, pad_mask=x.pad_mask, cache=x.cache, cp=x.cp, zxbcdt=zxbcdt)
        return m * self.ssm_out_multiplier

    def _attention_branch(self, h, qkv, x: LayerInputs):
        u = h * self.attention_in_multiplier if qkv is None else None
        o = self.self_attn(u, x.cos, x.sin, x.attn_mask, x.cache, x.ops, x.packed, x.cp, qkv=qkv)
        return o * self.attention_out_multiplier

    def _fused_input_projections(self, h):
        """h (b, l, d) → (zxbcdt, (q, k, v)) from one GEMM of h against [in_proj; q; k; v], or (None, None) where
        `one_gemm` declines. The input multipliers move to the outputs (a scalar commutes with the GEMM, not with a
        bias: projections with biases stay unfused; the released models have none)."""
        mix, att = self.mamba, self.self_attn
        linears = [mix.in_proj, att.q_proj, att.k_proj, att.v_proj]
        out = None if any(m.bias is not None for m in linears) else one_gemm(h, linears)
        if out is None:
            return None, None
        zxbcdt, *qkv = out
        if self.attention_in_multiplier != 1.0:
            qkv = [t * self.attention_in_multiplier for t in qkv]
        return zxbcdt * mix.ssm_in_multiplier * mix.mup_vector, tuple(qkv)

    def _feed_forward(self, x, chunk, fused):
        """x (b, l, d). With `chunk` and autograd recording (a checkpointed layer's recompute, or a training forward),
        rows longer than `chunk` run the MLP chunk by chunk, each under its own checkpoint: what the
        layer's backward holds of the MLP is one chunk's activations, not the row's. The MLP is per token, so the
        result and every gradient are unchanged; the cost is one more MLP forward."""
        if not chunk or x.size(1) <= chunk or not torch.is_grad_enabled():
            return self.feed_forward(x, fused)
        parts = [checkpoint(self.feed_forward, part, fused, use_reentrant=False) for part in x.split(chunk, dim=1)]
        return torch.cat(parts, dim=1)


class FalconH1PreTrainedModel(PreTrainedModel):
    config_class = FalconH1Config
    config: FalconH1Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FalconH1DecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True
    _keys_to_ignore_on_load_unexpected = [r"mup_vector", r"inv_freq"]

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers' `init.*` helpers skip tensors already loaded from a checkpoint; plain in-place
        # fills here would overwrite loaded weights when from_pretrained initialises what is left.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=5**0.5)  # PyTorch's default conv init
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (FalconH1RMSNorm, FalconH1RMSNormGated)):
            init.ones_(module.weight)
        elif isinstance(module, FalconH1Mixer):
            init.ones_(module.dt_bias)
            init.copy_(module.A_log, torch.log(torch.arange(1, module.n_heads + 1, dtype=torch.float32)))
            init.ones_(module.D)
            # non-persistent: never in a checkpoint, so always recomputed (meta-device init leaves garbage)
            module.mup_vector.copy_(mup_vector(self.config).to(module.mup_vector.device))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own hybrid cache (prepare_inputs_for_generation)


class FalconH1Model(FalconH1PreTrainedModel):
    def __init__(self, config: FalconH1Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(FalconH1DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = FalconH1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self._training_graphs = None  # model.graphs.enable_training_graphs
        # padding-free execution of padded batches (FalconH1ForCausalLM.set_padding_free): without a cache, a
        # batch with padding runs as one packed row of its real tokens; outputs come back in the padded layout
        self.padding_free = False
        self.context_parallel = None  # model.context_parallel.enable_context_parallel: the row split over ranks
        self.offload_activations = False  # FalconH1ForCausalLM.enable_activation_offload
        self.mlp_chunk_tokens = None  # long rows: the MLP in checkpointed token chunks (MLP_CHUNK_TOKENS)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        seq_idx=None,
        cu_seq_lens_q=None,
        max_length_q=None,
        checked_ids=False,
        real_token_index=None,
        **kwargs,
    ):
        """checked_ids: the caller has range-checked input_ids on the host (a Trainer's collator), so the device check
        and its host sync are skipped. A padding-free row (1, l) whose collator gives `cu_seq_lens_q` and
        `max_length_q` (TRL's, transformers' DataCollatorWithFlattening: boundaries of every token's document) takes
        them as the varlen kernel's boundaries instead of deriving them on the device, which waits for it twice.
        A padded batch run padding-free (`set_padding_free`) likewise takes its real tokens from the collator where
        it gives them: `real_token_index` (T,), the flat indices of the attention mask's real tokens in the (b·l)
        batch, with `cu_seq_lens_q` (b+1,) and `max_length_q`, the rows' boundaries among them and the longest row."""
        cache = kwargs.pop("cache", None) or past_key_values
        hidden = self._embed(input_ids, inputs_embeds, check=not checked_ids)
        b, l, _ = hidden.shape
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be 2D (batch, past+current length), got {tuple(attention_mask.shape)}"
            )
        # a collator that located the real tokens saw the padding on the host: no read of the mask on the device
        padded = real_token_index is not None or (attention_mask is not None and not bool(attention_mask.all()))
        if self.context_parallel is not None:
            if padded or cache is not None or use_cache:
                raise ValueError("context parallelism runs packed rows without padding or a cache")
            return self._forward_context_parallel(hidden, position_ids)
        continuing = cache is not None and cache.get_seq_length() > 0
        # packed rows (padding-free): documents marked by seq_idx, cu_seq_lens or restarting position_ids
        seq_idx = None if (padded or continuing) else resolve_seq_idx(position_ids, seq_idx, cu_seq_lens_q, l)
        if use_cache is None:  # default: a cache for inference, none for training or packed rows
            use_cache = self.config.use_cache and not self.training and seq_idx is None
        if padded and self.padding_free and not use_cache and cache is None:
            real = None
            if real_token_index is not None and cu_seq_lens_q is not None and isinstance(max_length_q, int):
                real = (real_token_index, cu_seq_lens_q.to(torch.int32), max_length_q)
            return self._forward_unpadded(hidden, attention_mask, position_ids, real)
        if use_cache and cache is None:
            cache = FalconH1HybridCache(self.config, b)
        if seq_idx is not None and cache is not None:
            raise ValueError("packed documents (seq_idx / restarting position_ids) cannot be combined with a cache")
        host_docs = None
        if seq_idx is not None and b == 1 and cu_seq_lens_q is not None and isinstance(max_length_q, int):
            host_docs = (cu_seq_lens_q.to(torch.int32), max_length_q)
        inputs = self._layer_inputs(hidden, attention_mask if padded else None, position_ids, seq_idx, cache, host_docs)
        hidden = self._run_layers(hidden, inputs)
        if cache is not None:
            cache.advance(l)
        return BaseModelOutputWithPast(last_hidden_state=self.final_layernorm(hidden), **{_CACHE_FIELD: cache})

    def _embed(self, input_ids, inputs_embeds, check=True):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if check:
                check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        # µP: the embedding multiplier applies to inputs_embeds too (HF skips it there, spec §9 #9)
        return inputs_embeds * self.config.embedding_multiplier

    def _layer_inputs(self, hidden, attention_mask, position_ids, seq_idx, cache, host_docs=None) -> LayerInputs:
        """What the layers share for hidden (b, l, d): positions (from the padding, or after the cache's), RoPE, the
        kernels, packed documents (varlen attention, or a dense document mask: the kernel bundle decides), masks.
        host_docs: (cu_seqlens, longest) of packed documents as the collator gave them, else derived from seq_idx."""
        b, l, _ = hidden.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_attention_mask(attention_mask)[:, -l:]
        elif position_ids is None:
            position_ids = torch.arange(past_len, past_len + l, device=hidden.device)[None].expand(b, l)
        ops = get_ops(hidden.device)
        cos, sin = _rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta_value, hidden.dtype)
        packed = None
        if seq_idx is not None and ops.varlen_for_packing:
            packed = host_docs or cu_seqlens_from_seq_idx(seq_idx)
        dense_docs = seq_idx if packed is None else None
        attn_mask = build_attention_mask(b, l, past_len, hidden.device, attention_mask, dense_docs)
        if isinstance(cache, StaticHybridCache):  # keys live in fixed buffers: the cache knows which are valid
            static_mask = cache.attention_mask(l, attention_mask)
            attn_mask = attn_mask if static_mask is None else static_mask
        pad_mask = attention_mask[:, -l:].to(hidden.dtype) if attention_mask is not None else None
        return LayerInputs(
            cos, sin, ops, attn_mask, seq_idx, packed, pad_mask, cache,
            mlp_chunk=self.mlp_chunk_tokens,
            fused=settings().fused_projections and ops.fast,
            streams=mixer_streams_wanted(in_graphs=False),
        )  # fmt: skip

    def _run_layers(self, hidden, inputs: LayerInputs):
        """The decoder layers: their captured graphs where training graphs serve this forward, else one by one."""
        graphs = self._training_graphs
        if graphs is not None and self.training and torch.is_grad_enabled():  # captured forward/backward per layer
            why = "cache" if inputs.cache is not None else "padding" if inputs.pad_mask is not None else None
            cu_seqlens, longest = inputs.packed if inputs.packed else (None, None)
            replayed = graphs(hidden, inputs.cos, inputs.sin, inputs.seq_idx, cu_seqlens, why, longest)
            if replayed is not None:
                return replayed
        with self._offload_context():
            for layer in self.layers:
                hidden = layer(hidden, inputs)
        return hidden

    def set_training_graphs(self, graphs) -> None:
        """model.graphs.enable_training_graphs: the captured layers (None: back to eager)."""
        self._training_graphs = graphs

    def configure(self, **switches) -> FalconH1Model:
        """Run-time switches: padding_free, context_parallel, offload_activations, mlp_chunk_tokens."""
        for name, value in switches.items():
            if name not in self._SWITCHES:
                raise ValueError(f"unknown switch {name!r}; known: {sorted(self._SWITCHES)}")
            setattr(self, name, value)
        return self

    _SWITCHES = frozenset({"padding_free", "context_parallel", "offload_activations", "mlp_chunk_tokens"})

    def _offload_context(self):
        """With `offload_activations`, tensors saved for backward go to pinned CPU memory during the forward. With
        reentrant per-layer checkpointing that is each layer's input: GPU memory then holds one layer's recompute."""
        if self.offload_activations and self.training and torch.is_grad_enabled():
            return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        return nullcontext()

    def _forward_context_parallel(self, hidden, position_ids):
        """This rank's two chunks (1, 2m) of a packed row split over ranks (model/context_parallel.py)."""
        cp = self.context_parallel
        if position_ids is None:  # one document over the whole row
            position_ids = cp.default_positions(hidden.size(1), hidden.device)
        cos, sin = _rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta_value, hidden.dtype)
        # conv, scan and attention take their document ids from the step
        inputs = LayerInputs(
            cos, sin, get_ops(hidden.device), cp=cp.step(position_ids), mlp_chunk=self.mlp_chunk_tokens
        )
        with self._offload_context():
            for layer in self.layers:
                hidden = layer(hidden, inputs)
        return BaseModelOutputWithPast(last_hidden_state=self.final_layernorm(hidden), **{_CACHE_FIELD: None})

    def _forward_unpadded(self, hidden, attention_mask, position_ids=None, real=None):
        """A padded batch (b, l) of embedded tokens run as one packed row of its T real tokens, each row its own
        document (exact isolation in the scan, the conv and attention), then scattered back: pads get zeros, never
        computed. real: (index (T,), cu_seqlens (b+1,), longest) of the real tokens, found by the collator on the
        host; else they are found here, which reads the mask back from the device."""
        b, l, d = hidden.shape
        if position_ids is None:
            position_ids = positions_from_attention_mask(attention_mask)[:, -l:]
        if real is None:
            keep = attention_mask[:, -l:].bool()  # (b, l)
            index = keep.reshape(-1).nonzero().squeeze(1)  # (T,) flat index of each real token
            docs = None
        else:
            index, cu_seqlens, longest = real
            docs = (cu_seqlens, longest)
        packed = hidden.reshape(b * l, d).index_select(0, index)[None]  # (1, T, d)
        seq_idx = (index // l).to(torch.int32)[None]  # (1, T) each token's row: its document
        positions = position_ids.reshape(-1).index_select(0, index)[None]
        inputs = self._layer_inputs(packed, None, positions, seq_idx, None, docs)
        out = self.final_layernorm(self._run_layers(packed, inputs))
        scattered = out.new_zeros(b * l, d).index_copy(0, index, out[0]).view(b, l, d)
        return BaseModelOutputWithPast(last_hidden_state=scattered, **{_CACHE_FIELD: None})


def configure_backbones(model: nn.Module, **settings) -> bool:
    """Sets run-time switches (padding_free, context_parallel, offload_activations, mlp_chunk_tokens) on every
    FalconH1Model inside `model`, through PEFT or any other wrapper. False when there is none."""
    found = False
    for module in model.modules():
        if isinstance(module, FalconH1Model):
            module.configure(**settings)
            found = True
    return found


class FalconH1ForCausalLM(FalconH1PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FalconH1Config):
        super().__init__(config)
        self.model = FalconH1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decode_settings = DecodeSettings()
        self._static_caches = StaticCaches()
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def enable_activation_offload(self, enabled: bool = True, mlp_chunk_tokens: int | None = MLP_CHUNK_TOKENS):
        """Long context on one GPU: per-layer activation checkpointing (reentrant) whose saved layer inputs live in
        pinned CPU memory; the GPU keeps one layer's recompute at a time, its MLP in checkpointed chunks of
        `mlp_chunk_tokens` (None: whole rows). Gradients are unchanged."""
        if enabled:
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        self.model.offload_activations = enabled
        self.model.mlp_chunk_tokens = mlp_chunk_tokens if enabled else None
        return self

    def compile_layers(self, backend: str | None = None, dynamic: bool | None = None, **options) -> FalconH1ForCausalLM:
        """Regional torch.compile: every decoder layer's arithmetic compiled (`FalconH1DecoderLayer.block`), the same
        code serving all of them, inside HF's activation checkpointing when that is on. Inductor fuses what eager
        runs as separate kernels — norms, RoPE, the µP multipliers, the gates and the causal conv (traced as shifted
        multiply-adds) — while the scan (one custom op), attention and GEMMs stay the kernels `get_ops` chose. With
        dynamic=None the first length compiles static and the second recompiles with a symbolic length, so
        padding-free batches of varying length (TRL's packing) compile twice, not per batch. Embedding, loss and
        optimizer stay outside (the loss compiles its own chunk on CUDA, model/loss.py); forwards with a cache or
        context parallelism run eagerly. backend: default model.settings.compile_backend, else inductor on CUDA and
        aot_eager elsewhere, decided by the device the layers run on (`_compiled_block`)."""
        compiled = (backend or settings().compile_backend, dynamic, dict(options))
        for layer in self.model.layers:
            layer.compiled = compiled
        return self

    def set_padding_free(self, enabled: bool = True) -> FalconH1ForCausalLM:
        """Run padded batches without their pads (training and scoring forwards, i.e. without a cache): the
        real tokens of all rows form one packed row with each row its own document. Outputs keep the padded
        layout and equal the padded computation; pads cost nothing. Generation is unaffected."""
        self.model.padding_free = enabled
        return self

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        past_key_values=None,
        cache=None,
        use_cache=None,
        logits_to_keep=0,
        inputs_embeds=None,
        shift_labels=None,
        num_items_in_batch=None,
        return_logits=False,
        loss_metrics=False,
        **kwargs,
    ):
        """Causal LM forward. With `labels` (or pre-shifted `shift_labels`) the loss is a chunked CE over the
        scaled logits and the full logits are not built unless `return_logits=True`. loss_metrics: the loss is
        taken without a host sync and the output carries `token_metrics` (model.loss.TokenMetrics: scored tokens,
        summed entropy, top-1 hits, on the device); the labels' range is then the caller's to check on the host."""
        cache = cache if cache is not None else past_key_values
        for unused in ("output_attentions", "output_hidden_states", "return_dict", "cache_position"):
            kwargs.pop(unused, None)
        if replayable(cache, input_ids, labels):  # a decode step: the captured forward (model/decode.py)
            logits = cache.decoder(self, input_ids, position_ids)
            return CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: cache})
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        mult = self.config.lm_head_multiplier
        loss = logits = metrics = None
        if labels is not None or shift_labels is not None:
            loss_fn = causal_lm_loss_and_metrics if loss_metrics else chunked_causal_lm_loss
            loss = loss_fn(
                hidden,
                self.lm_head.weight,
                labels,
                mult,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
            )
            if loss_metrics:
                loss, metrics = loss
        if loss is None or return_logits:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep]) * mult
        cache_out = {_CACHE_FIELD: getattr(out, _CACHE_FIELD)}
        return FalconCausalLMOutput(loss=loss, logits=logits, token_metrics=metrics, **cache_out)

    # ------------------------------------------------------------------ generation
    def set_decode(self, **settings) -> FalconH1ForCausalLM:
        """How `generate` decodes (`model.decode.DecodeSettings`): static_cache (None: on CUDA), graphs, compile,
        length_multiple, keep. Cached graphs of earlier settings are dropped."""
        for name, value in settings.items():
            if not hasattr(self.decode_settings, name):
                raise ValueError(f"unknown decode setting {name!r}; known: {list(vars(self.decode_settings))}")
            setattr(self.decode_settings, name, value)
        self._static_caches.clear()
        return self

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' `generate`, over a static hybrid cache whose decode step replays a CUDA graph where it can
        (on CUDA, one sequence per prompt: greedy or sampled, left-padded batches, stop strings, streamers); else
        the eager path with the dynamic cache. The path taken is logged once per reason."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        cache, why = static_cache_for(self, self.decode_settings, input_ids, generation_config, kwargs)
        if why not in _LOGGED_PATHS:
            logger.info("generate: %s", why)
            _LOGGED_PATHS.add(why)
        if cache is not None:
            kwargs[_CACHE_FIELD] = cache
        return super().generate(inputs, generation_config, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, use_cache=True, **kwargs
    ):
        """Feeds only the tokens the cache has not seen; positions follow the attention mask (left padding)."""
        cache = kwargs.pop("cache", None) or past_key_values
        if use_cache and cache is None:
            cache = FalconH1HybridCache(self.config, input_ids.shape[0])
        seen = cache.get_seq_length() if cache is not None else 0
        inputs = {}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
            new = inputs_embeds.shape[1]
        else:
            inputs["input_ids"] = input_ids[:, seen:]
            new = input_ids.shape[1] - seen
        if attention_mask is not None:
            inputs["position_ids"] = positions_from_attention_mask(attention_mask)[:, -new:]
        inputs.update(
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=use_cache,
            logits_to_keep=kwargs.get("logits_to_keep") or 1,
        )
        return inputs

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *args, allow_pickle: bool = False, strict: bool = True, **kwargs
    ):
        """transformers' loader, made strict: safetensors only unless `allow_pickle=True`, and any missing,
        unexpected or mis-shaped tensor is an error naming the key."""
        path = Path(os.fspath(pretrained_model_name_or_path))
        if path.is_dir() and not allow_pickle:
            has_safetensors = any(path.glob("*.safetensors"))
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            if pickles and not has_safetensors:
                raise ValueError(
                    f"{path}: only pickle checkpoints found ({', '.join(pickles)}); pickles can run arbitrary code "
                    "when loaded. Convert to safetensors, or pass allow_pickle=True if you trust the source."
                )
        if not allow_pickle:
            kwargs.setdefault("use_safetensors", True)
        kwargs["output_loading_info"] = True
        if strict:  # let transformers finish loading, then name every mismatch ourselves
            kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if strict:
            _raise_on_loading_problems(path, info, model)
        return model


def _raise_on_loading_problems(path, info, model) -> None:
    problems = []
    tied = set(model._tied_weights_keys or {}) if model.config.tie_word_embeddings else set()
    missing = [k for k in info.get("missing_keys", []) if k not in tied]
    if missing:
        problems.append(f"missing keys: {sorted(missing)}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected keys: {sorted(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        problems.append("shape mismatches (key, checkpoint, model): " + str(sorted(info["mismatched_keys"])))
    if problems:
        raise ValueError(f"{path}: checkpoint does not match FalconH1ForCausalLM — " + "; ".join(problems))
