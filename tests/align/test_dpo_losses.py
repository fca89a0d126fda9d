"""Every DPO loss align/dpo.py offers, on hand-made log-probs, through the trainer's own loss code.

The trainer's `_compute_loss` (TRL 1.16's, and FalconDPOTrainer's sync-free step for the losses that covers) is fed
per-token log-probs chosen by hand through a stand-in model, so what is checked is the code that trains. Each loss: the preferred answer gives
the lower loss, and the value equals a direct computation from the loss's paper formula. `dpo_norm` (TII's
length-normalised DPO, open-instruct's name) is shown to be exactly TRL's `sigmoid_norm` and our pure function.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from trl import DPOConfig
from trl.trainer.utils import FusedCausalLMOutput

from align.preference import (
    LOSS_ALIASES,
    OWN_STEP_LOSSES,
    TRL_LOSSES,
    FalconDPOTrainer,
    dpo_norm_loss,
    resolve_loss_types,
)

BETA = 0.5
CHOSEN = [-0.5, -1.0, -0.2]  # per-token log-probs of the chosen completion (3 tokens) under the policy
REJECTED = [-2.0, -1.5]  # and of the rejected one (2 tokens)
REF_CHOSEN, REF_REJECTED = -2.0, -3.0  # summed reference log-probs


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics


class _StandIn(torch.nn.Module):
    """Returns the given per-token log-probs as TRL's fused LM head would (zero at non-completion positions)."""

    def __init__(self, log_probs):
        super().__init__()
        self.log_probs = log_probs

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return FusedCausalLMOutput(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trainer_loss(loss_type, chosen, rejected, ref_chosen, ref_rejected, tmp_path, own_step=False, **config):
    """The loss FalconDPOTrainer computes for one pair: a 1-token prompt, then the completions; `own_step`: through
    the sync-free step (else TRL's)."""
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, loss_type=[loss_type], beta=BETA, **config)
    trainer = FalconDPOTrainer.__new__(FalconDPOTrainer)
    trainer.args, trainer.accelerator, trainer.own_step = args, _Accelerator(), own_step
    trainer.loss_types, trainer.loss_weights = resolve_loss_types(args.loss_type), [1.0]
    trainer.beta, trainer.label_smoothing, trainer.ld_alpha = args.beta, args.label_smoothing, args.ld_alpha
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = "reverse_kl", args.f_alpha_divergence_coef
    trainer.use_weighting, trainer.aux_loss_enabled, trainer.precompute_ref_logps = False, False, True
    trainer._metrics, trainer._total_train_tokens, trainer._tp_size = {"train": {}, "eval": {}}, 0, 1
    from collections import defaultdict

    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    if own_step:
        trainer._keep_metrics_on_device()
    width = 1 + max(len(chosen), len(rejected))
    completion = torch.zeros(2, width, dtype=torch.long)
    log_probs = torch.zeros(2, width - 1)
    for row, tokens in enumerate((chosen, rejected)):
        completion[row, 1 : 1 + len(tokens)] = 1
        log_probs[row, : len(tokens)] = torch.tensor(tokens)
    inputs = {
        "input_ids": torch.ones(2, width, dtype=torch.long),
        "attention_mask": (completion.cumsum(1) > 0).long() | (torch.arange(width) == 0).long(),
        "completion_mask": completion,
        "ref_chosen_logps": torch.tensor([ref_chosen]),
        "ref_rejected_logps": torch.tensor([ref_rejected]),
    }
    model = _StandIn(log_probs)
    trainer.model = model.train()
    return float(trainer._compute_loss(model, inputs, return_outputs=False))


def direct(loss_type, chosen, rejected, ref_chosen, ref_rejected, eps=0.0):
    """The paper formulas, written out for one pair."""
    lc, lr = len(chosen), len(rejected)
    c, r = sum(chosen) - ref_chosen, sum(rejected) - ref_rejected  # log-ratios
    t = torch.tensor
    logsig, sig = lambda x: float(F.logsigmoid(t(x))), lambda x: float(torch.sigmoid(t(x)))
    d = BETA * (c - r)
    return {
        "sigmoid": -logsig(d),
        "hinge": max(0.0, 1 - d),
        "ipo": (c / lc - r / lr - 1 / (2 * BETA)) ** 2,
        "exo_pair": sig(d) * (logsig(d) - math.log1p(-eps)) + sig(-d) * (logsig(-d) - math.log(eps)) if eps else None,
        "nca_pair": -logsig(BETA * c) - 0.5 * logsig(-BETA * c) - 0.5 * logsig(-BETA * r),
        "robust": (-(1 - eps) * logsig(d) + eps * logsig(-d)) / (1 - 2 * eps),
        "bco_pair": -logsig(BETA * c) - logsig(-BETA * r),
        "sppo_hard": (c - 0.5 / BETA) ** 2 + (r + 0.5 / BETA) ** 2,
        "aot": -(1 - eps) * logsig(d) - eps * logsig(-d),  # one pair: sorting changes nothing
        "aot_unpaired": -(1 - eps) * logsig(d) - eps * logsig(-d),
        "apo_zero": 1 - sig(BETA * c) + sig(BETA * r),
        "apo_down": sig(BETA * c) + 1 - sig(BETA * (c - r)),
        "discopop": -logsig(d) * (1 - sig(d / 0.05)) + math.exp(-d) * sig(d / 0.05),
        "sft": -sum(chosen) / lc,
        "sigmoid_norm": -logsig(BETA * (c / lc - r / lr)),
    }[loss_type]


def _config(loss_type):
    if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired"):
        return {"label_smoothing": 1e-3 if loss_type == "exo_pair" else 0.1}
    return {}


STEPS = [(name, False) for name in TRL_LOSSES + tuple(LOSS_ALIASES)]
STEPS += [(name, True) for name in TRL_LOSSES + tuple(LOSS_ALIASES) if resolve_loss_types(name)[0] in OWN_STEP_LOSSES]


@pytest.mark.parametrize("loss_type, own_step", STEPS, ids=[f"{n}-{'own' if o else 'trl'}" for n, o in STEPS])
def test_preferred_answer_gives_the_lower_loss_and_values_match(loss_type, own_step, tmp_path):
    cfg = _config(loss_type)
    eps = cfg.get("label_smoothing", 0.0)
    name = resolve_loss_types([loss_type])[0]
    good = trainer_loss(loss_type, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, tmp_path, own_step, **cfg)
    bad = trainer_loss(loss_type, REJECTED, CHOSEN, REF_REJECTED, REF_CHOSEN, tmp_path, own_step, **cfg)  # swapped
    assert good < bad, (loss_type, good, bad)
    assert good == pytest.approx(direct(name, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, eps), rel=1e-5, abs=1e-6)
    assert bad == pytest.approx(direct(name, REJECTED, CHOSEN, REF_REJECTED, REF_CHOSEN, eps), rel=1e-5, abs=1e-6)


def test_dpo_norm_is_sigmoid_norm_and_our_pure_function(tmp_path):
    """Length normalisation matters: the same pair under sum-DPO and dpo_norm differ, dpo_norm = the pure function."""
    norm = trainer_loss("dpo_norm", CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, tmp_path)
    pure = dpo_norm_loss(
        torch.tensor([sum(CHOSEN)]),
        torch.tensor([sum(REJECTED)]),
        torch.tensor([REF_CHOSEN]),
        torch.tensor([REF_REJECTED]),
        torch.tensor([3.0]),
        torch.tensor([2.0]),
        BETA,
    )
    assert norm == pytest.approx(float(pure), rel=1e-6)
    summed = trainer_loss("sigmoid", CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, tmp_path)
    assert abs(summed - norm) > 1e-3
    # at the start of DPO the policy is the reference: every pair costs ln 2
    start = dpo_norm_loss(*(torch.tensor([v]) for v in (-4.0, -7.0, -4.0, -7.0, 3.0, 5.0)), beta=5.0)
    assert float(start) == pytest.approx(math.log(2), rel=1e-6)


def test_unknown_loss_names_are_refused():
    with pytest.raises(ValueError, match="dpo_nrom"):
        resolve_loss_types(["dpo_nrom"])
