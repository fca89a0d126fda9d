"""Tiny GRPO through align/grpo.py and TRL: decode/training log-prob agreement, advantages as TRL computes them,
learning, the reference for KL, recipe strictness."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer
from trl.trainer.utils import add_fused_lm_head

from align import grpo
from align.grpo_trainer import (
    completion_lengths,
    generate_with_logps,
    left_pad,
    logprob_agreement,
    sampled_token_logps,
)
from align.offline.tasks import examples
from align.preference import set_padding_free
from align.templates import falcon_h1_chat_template
from model import FalconH1ForCausalLM
from tests.align.helpers import CPU_TRAINING, make_tiny_base

RECIPE = "recipes/tiny/grpo.yaml"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    make_tiny_base(root / "base", lm_head_multiplier=0.5)  # a logit multiplier ≠ 1: both sides must apply it
    rows = [r for r in examples("train") if r["language"] in ("en", "fr", "ru")][::20][:64]
    (root / "questions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return root


def low_ids(completion_ids, **kwargs):
    """A user reward (named by import path in the tests): the share of completion tokens with an id below 200."""
    return [sum(t < 200 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def _run(base, out, *flags, rewards=("exact_answer",)):
    argv = ["--config", RECIPE, "--model_name_or_path", str(base / "base"), "--output_dir", str(out), *CPU_TRAINING]
    argv += ["--sources", json.dumps([{"path": str(base / "questions.jsonl"), "language_column": "language"}])]
    argv += ["--reward_funcs", *rewards, "--reward_weights", *["1.0"] * len(rewards), *flags]
    return grpo.main(argv)


# ---------------------------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_decode_logps_equal_training_forward_fp32(base, temperature):
    """Sampled tokens' log-probs from the decode steps of a left-padded batch equal TRL's fused training forward
    on prompt+completion, padded and packed (padding-free), within 1e-5 in fp32."""
    model = FalconH1ForCausalLM.from_pretrained(base / "base").eval()
    tok = AutoTokenizer.from_pretrained(base / "base")
    tok.chat_template = falcon_h1_chat_template()
    questions = ["What is 3 plus 4?", "Quel nombre vient après 41 ?", "Сколько будет 12 плюс 9? Ответьте числом."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    assert len({len(p) for p in prompts}) == 3  # left padding differs per row
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    settings = dict(do_sample=True, temperature=temperature, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    completion, sampled = generate_with_logps(model, ids, mask, temperature, eos_token_id=[2**20], **settings)
    assert completion.shape == sampled.shape == (3, 6)
    torch.manual_seed(0)  # the same draw, its logits kept whole: the step-by-step record equals them
    out = model.generate(input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True,
                         eos_token_id=[2**20], **settings)  # fmt: skip
    assert torch.equal(out.sequences[:, ids.size(1) :], completion)
    torch.testing.assert_close(sampled_token_logps(out.logits, completion, temperature), sampled, rtol=0, atol=1e-6)

    add_fused_lm_head(model, temperature=temperature)
    full = torch.cat([ids, completion], 1)
    full_mask = torch.cat([mask, torch.ones_like(completion)], 1)
    labels = full.clone()
    labels[:, : ids.size(1)] = -100
    for packed in (False, True):
        set_padding_free(model, packed)
        with torch.no_grad():
            train = model(input_ids=full, attention_mask=full_mask, labels=labels, fused_lm_head=True).log_probs
        stats = logprob_agreement(train[:, -completion.size(1) :], sampled, torch.ones_like(completion))
        assert stats["abs_diff_max"] <= 1e-5, (packed, stats)
        assert abs(stats["ratio_max"] - 1) < 1e-5 and abs(stats["ratio_min"] - 1) < 1e-5
    assert sampled.max() < 0 and sampled.min() > -10  # real log-probs, not zeros


def test_agreement_detects_a_mismatch():
    sampled = torch.tensor([[-1.0, -2.0, -3.0]])
    train = torch.tensor([[-1.0, -2.5, -9.0]])
    stats = logprob_agreement(train, sampled, torch.tensor([[1, 1, 0]]))  # the third token is padding
    assert stats["abs_diff_max"] == pytest.approx(0.5) and stats["abs_diff_mean"] == pytest.approx(0.25)
    assert stats["ratio_min"] == pytest.approx(math.exp(-0.5)) and stats["ratio_max"] == pytest.approx(1.0)


def test_completion_lengths_stop_after_first_stop_token():
    completion = torch.tensor([[5, 6, 2, 7], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert completion_lengths(completion, [2]).tolist() == [3, 4, 1]


def test_trainer_logs_agreement_and_advantages_equal_trls(base, tmp_path):
    """Through align/grpo.py: every step logs the agreement (≤ 1e-5 in fp32, padding-free training rows), and the
    advantages the trainer hands the loss are TRL's: (r − group mean) / (group std + 1e-4), Bessel-corrected."""
    trainer = _run(
        base, tmp_path / "out", "--max_steps", "2", "--per_device_train_batch_size", "12", "--num_generations", "4",
        "--max_completion_length", "5", rewards=("tests.align.test_grpo:low_ids", "exact_answer"),
    )  # fmt: skip
    assert len(trainer.logprob_history) == 2
    assert all(h["abs_diff_max"] <= 1e-5 and h["ratio_std"] < 1e-5 for h in trainer.logprob_history)
    logged = [h for h in trainer.state.log_history if "logprobs/abs_diff_max" in h]
    assert len(logged) == 2 and all(h["logprobs/abs_diff_max"] <= 1e-5 for h in logged)

    batch = [trainer.train_dataset[i] for i in range(3) for _ in range(4)]  # 3 prompts × 4 generations
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch)
    low = torch.tensor(list(trainer._logs["rewards"]["low_ids"])[-12:])
    exact = torch.tensor(list(trainer._logs["rewards"]["exact_answer"])[-12:])
    groups = (low + exact).view(3, 4)
    expected = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(out["advantages"], expected.flatten(), rtol=0, atol=1e-5)
    assert out["advantages"].abs().sum() > 0  # the rewards vary within groups: a real test
    assert out["sampling_per_token_logps"].shape == out["completion_ids"].shape


# ---------------------------------------------------------------------------------------------- learning
def test_tiny_grpo_raises_the_mean_reward(base, tmp_path):
    trainer = _run(
        base, tmp_path / "out", "--max_steps", "16", "--per_device_train_batch_size", "64", "--num_generations", "8",
        "--max_completion_length", "2", "--learning_rate", "1e-2", "--num_iterations", "2",
        rewards=("tests.align.test_grpo:low_ids",),
    )  # fmt: skip
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + 0.15, rewards
    # num_iterations 2: the second pass is off-policy, so TRL's old log-probs (before the update) are compared
    assert max(h["abs_diff_max"] for h in trainer.logprob_history) <= 1e-5
    assert (tmp_path / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- reference
def test_lora_reference_is_the_base_with_adapters_disabled(base, tmp_path):
    flags = ["--max_steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4", "--beta", "0.1"]
    flags += ["--max_completion_length", "3", "--use_peft", "True", "--lora_r", "4", "--lora_alpha", "8"]
    trainer = _run(base, tmp_path / "lora", *flags)
    assert trainer.ref_model is None and trainer.beta == 0.1  # TRL disables the adapters: no second copy
    assert any("kl" in h for h in trainer.state.log_history)


def test_full_reference_is_our_model(base, tmp_path):
    flags = ["--max_steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4", "--beta", "0.1"]
    trainer = _run(base, tmp_path / "full", *flags, "--max_completion_length", "3")
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert isinstance(ref, FalconH1ForCausalLM) and ref.model.padding_free and trainer.beta == 0.1
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kl and kl[0] == pytest.approx(0.0, abs=1e-6)  # before the first update policy = reference


# ---------------------------------------------------------------------------------------------- recipe
def test_unknown_recipe_key_and_bad_values_are_refused(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(open(RECIPE).read() + "num_generation: 4\n")
    with pytest.raises(ValueError, match="num_generation"):
        grpo.parse(["--config", str(bad)])
    with pytest.raises(ValueError, match="loss_type"):
        grpo.parse(["--config", RECIPE, "--loss_type", "ppo"])
    with pytest.raises(ValueError, match="at least 2 generations"):
        grpo.parse(["--config", RECIPE, "--num_generations", "1"])
    align_args, args, _ = grpo.parse(["--config", RECIPE, "--beta", "0"])  # GRPO's beta 0: no KL term
    assert args.beta == 0.0 and align_args.reward_funcs == ["exact_answer", "language_consistency"]
