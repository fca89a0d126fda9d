"""GRPO on top of TRL's `GRPOTrainer`: one model samples and learns, and their log-probs are compared every step.

What TRL 1.16 leaves out and this adds:
- **Generation by falcon-align's `generate`** (the static cache and CUDA-graph decode step on CUDA, model/decode.py),
  keeping the log-prob of every sampled token from the decode step's raw logits, in fp32, with the temperature the
  training forward divides by (TRL's fused LM head), one step at a time (`SampledLogps`). TRL then carries them as
  `sampling_per_token_logps`.
- **Log-prob agreement, measured every step**: the training forward's log-probs of the same tokens before the
  update (the policy's own when generation and optimizer steps are aligned, else TRL's `old_per_token_logps`)
  against the decode step's, logged as `logprobs/abs_diff_mean`, `logprobs/abs_diff_max` and the importance
  ratio's spread `logprobs/ratio_min`, `_max`, `_std` (ratio = exp(train − sampled) per completion token).
- **Padding-free training forward**: prompt + completion rows, left- and right-padded by TRL, run inside
  falcon-align's model as one packed row of their real tokens, each its own document in the SSM scan, the conv
  and attention (exact, like DPO's).
- **The reference for KL (beta > 0)**: with LoRA, the base with adapters disabled (TRL's way, no copy); with full
  fine-tuning, a copy the script loads as falcon-align's model (TRL would load transformers' class).
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

from .preference import set_padding_free
from .validate import GRPO_LOSS_TYPES as TRL_LOSSES

logger = logging.getLogger("falcon_align.grpo")


def check_loss_type(name: str) -> str:
    if name not in TRL_LOSSES:
        raise ValueError(f"loss_type {name!r} unknown; choose from {', '.join(TRL_LOSSES)}")
    return name


def sampled_token_logps(step_logits, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of the sampled tokens under the temperature-scaled distribution the training forward scores.

    step_logits: T tensors (B, V), the raw logits of each decode step (lm_head multiplier applied);
    tokens: (B, T) the tokens sampled from them. → (B, T) fp32. One step at a time: no (B, T, V) tensor."""
    out = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
    for t, logits in enumerate(step_logits):
        z = logits.float() / temperature  # fp32, as TRL's fused LM head scores
        out[:, t] = z.gather(-1, tokens[:, t, None].to(z.device))[:, 0].to(out.device) - z.logsumexp(-1).to(out.device)
    return out


class SampledLogps:
    """The log-prob of every sampled token, recorded during one `generate` from each decode step's raw logits (fp32,
    divided by the temperature): each forward's last-position distribution is kept until the next forward shows the
    token sampled from it, so memory holds one (B, V) distribution, not all T of them. A forward hook on the model;
    the CUDA-graph decode step's warm-up and capture forwards are skipped (the replays are recorded)."""

    def __init__(self, model, temperature: float):
        self.temperature = temperature
        self.previous = None  # (B, V) log-probs of the last forward's next token
        self.steps: list[torch.Tensor] = []
        self.handle = model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        cache = kwargs.get("past_key_values") or kwargs.get("cache")
        if getattr(getattr(cache, "decoder", None), "capturing", False):
            return
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        if self.previous is not None:  # ids[:, -1] was sampled from the previous forward's distribution
            self.steps.append(self.previous.gather(-1, ids[:, -1:])[:, 0])
        z = output.logits[:, -1].float() / self.temperature  # fp32 as TRL's fused LM head
        self.previous = z - z.logsumexp(-1, keepdim=True)

    def finish(self, completion: torch.Tensor) -> torch.Tensor:
        """completion (B, T) the sampled tokens → (B, T) their log-probs; removes the hook."""
        self.handle.remove()
        if completion.size(1):
            self.steps.append(self.previous.gather(-1, completion[:, -1:])[:, 0])
        if len(self.steps) != completion.size(1):
            raise RuntimeError(f"recorded {len(self.steps)} decode steps for {completion.size(1)} sampled tokens")
        return torch.stack(self.steps, 1) if self.steps else completion.new_zeros(completion.shape, dtype=torch.float)


def generate_with_logps(model, input_ids, attention_mask, sampling_temperature: float, **generate_kwargs):
    """`model.generate` on a left-padded batch → (completion (B, T), the sampled tokens' log-probs (B, T) fp32 at
    `sampling_temperature`, the temperature the generation config samples at)."""
    from .fast_path import falcon_model

    # the module whose forward returns the logits (under PEFT, the one inside)
    scored = falcon_model(model) or (model.get_base_model() if hasattr(model, "get_base_model") else model)
    recorder = SampledLogps(scored, sampling_temperature)
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
    except BaseException:
        recorder.handle.remove()
        raise
    completion = out[:, input_ids.size(1) :]
    return completion, recorder.finish(completion)


def completion_lengths(completion: torch.Tensor, stop_ids) -> torch.Tensor:
    """(B, T) generated tokens → (B,) tokens up to and including the first stop token (T when none)."""
    stops = torch.isin(completion, torch.tensor(list(stop_ids), device=completion.device))
    first = torch.where(stops.any(1), stops.int().argmax(1) + 1, completion.size(1))
    return first


def logprob_agreement(train_logps: torch.Tensor, sampled_logps: torch.Tensor, mask: torch.Tensor) -> dict:
    """Training-forward vs decode-step log-probs of the same tokens, (B, T) each over mask (B, T) →
    {abs_diff_mean, abs_diff_max, ratio_min, ratio_max, ratio_std}; ratio = exp(train − sampled) per token."""
    keep = mask.bool()
    diff = (train_logps.float() - sampled_logps.float())[keep]
    if diff.numel() == 0:
        return {k: 0.0 for k in ("abs_diff_mean", "abs_diff_max", "ratio_min", "ratio_max", "ratio_std")}
    ratio = diff.exp()
    return {
        "abs_diff_mean": diff.abs().mean().item(),
        "abs_diff_max": diff.abs().max().item(),
        "ratio_min": ratio.min().item(),
        "ratio_max": ratio.max().item(),
        "ratio_std": ratio.std().item() if ratio.numel() > 1 else 0.0,
    }


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (ids, attention_mask), each (B, longest), padded on the left."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    return ids.to(device), mask.to(device)


class FalconGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with generation through the model's own `generate`, the log-prob agreement of decode and
    training measured every step, padding-free training rows, and falcon-align's model as the KL reference.

    `ref_model`: full fine-tuning with beta > 0 only (None: TRL's behaviour). `padding_free`: run padded training
    rows without their pads inside falcon-align's model."""

    def __init__(self, *args, ref_model=None, padding_free: bool = True, **kwargs):
        config = kwargs["args"]
        check_loss_type(config.loss_type)
        if padding_free and not set_padding_free(kwargs["model"], True):
            logger.warning("padding_free needs falcon-align's Falcon-H1 model; other models run padded")
        self.logprob_history: list[dict] = []  # one entry per training forward, for logs and tests
        self._captured_logps = None
        beta = config.beta
        own_reference = ref_model is not None and beta != 0.0 and not config.sync_ref_model
        if own_reference:
            config.beta = 0.0  # TRL would load a second reference as transformers' class: ours replaces it below
        try:
            super().__init__(*args, **kwargs)
        finally:
            config.beta = beta
        self.beta = beta
        if own_reference and not is_peft_model(self.model):
            self.ref_model = self._prepare_reference(ref_model, padding_free)

    def _prepare_reference(self, ref_model, padding_free):
        from trl.models import prepare_deepspeed, prepare_fsdp

        if self.args.disable_dropout:
            disable_dropout_in_model(ref_model)
        if padding_free:
            set_padding_free(ref_model, True)
        add_fused_lm_head(ref_model, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(ref_model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(ref_model, self.accelerator)
        return self.accelerator.prepare_model(ref_model.eval(), evaluation_mode=True)

    # ------------------------------------------------------------------ generation
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.use_vllm or self.use_transformers_continuous_batching or images or multimodal_fields:
            fields = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
            return super()._generate_single_turn(*fields)
        ids, mask = left_pad(prompt_ids, self._tokenizer.pad_token_id, self.accelerator.device)
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            completion, logps = generate_with_logps(
                unwrapped, ids, mask, self.temperature, generation_config=self.generation_config
            )  # (B, T) each
        logps = logps.cpu()
        lengths = completion_lengths(completion, self.eos_token_ids).tolist()
        completion = completion.cpu()
        return (
            [completion[i, :n].tolist() for i, n in enumerate(lengths)],
            [logps[i, :n].tolist() for i, n in enumerate(lengths)],
        )

    # ------------------------------------------------------------------ agreement
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._captured_logps is not None:
            self._captured_logps.append(logps.detach())
        return logps, entropies, aux

    def _compute_loss(self, model, inputs):
        self._captured_logps = []
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            captured, self._captured_logps = self._captured_logps, None
        sampled = inputs.get("sampling_per_token_logps")
        if sampled is not None and captured:
            # before the update: TRL's old log-probs when it computed them (misaligned steps), else the policy's own
            before = inputs.get("old_per_token_logps")
            before = captured[0] if before is None else before
            mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
            self._log_agreement(logprob_agreement(before, sampled, mask))
        return loss

    def _log_agreement(self, stats: dict) -> None:
        mode = "train" if self.model.training else "eval"
        values = torch.tensor([stats[k] for k in sorted(stats)], device=self.accelerator.device)
        gathered = self.accelerator.gather(values[None]).view(-1, len(stats))
        merged = {}
        for j, key in enumerate(sorted(stats)):
            column = gathered[:, j]
            merged[key] = (
                column.max() if key.endswith("max") else column.min() if key.endswith("min") else column.mean()
            ).item()
            self._metrics[mode][f"logprobs/{key}"].append(merged[key])
        self.logprob_history.append(merged)
