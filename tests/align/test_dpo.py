"""Tiny DPO end to end through align/dpo.py and TRL: padding-free exactness, learning, the LoRA reference without
a copy, the reference log-prob cache, counted drops."""

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DPOConfig

from align import dpo
from align.eval import completion_logps, pairs_from_rows
from align.offline.tasks import preference_pairs
from align.preference import FalconDPOTrainer, set_padding_free
from align.templates import falcon_h1_chat_template
from model import FalconH1ForCausalLM
from tests.align.helpers import CPU_TRAINING, make_tiny_base
from tests.conftest import rel_err

COMMON = CPU_TRAINING + [
    "--per_device_train_batch_size",
    "8",
    "--max_length",
    "64",
    "--loss_type",
    "dpo_norm",
    "--beta",
    "5.0",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Falcon-H1 checkpoint (logit multiplier ≠ 1) with the project's tokenizer, and 32 preference pairs."""
    root = tmp_path_factory.mktemp("dpo")
    make_tiny_base(root / "base", lm_head_multiplier=0.5)
    rows = [r for r in preference_pairs("train") if r["language"] in ("en", "fr", "de")][::13][:32]
    rows[0] = {**rows[0], "prompt": rows[0]["prompt"] + " Please answer with a number only."}  # lengths vary
    (root / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return root


def _rows(base):
    return [json.loads(line) for line in (base / "pairs.jsonl").read_text().splitlines()]


def _dataset(rows):
    return Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs_from_rows(rows)])


def _tokenizer(base):
    tok = AutoTokenizer.from_pretrained(base / "base")
    tok.chat_template = falcon_h1_chat_template()
    return tok


def make_trainer(base, out, rows=None, model=None, cache=None, sync_free=None, **config):
    settings = dict(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=8,
        max_length=64,
        precompute_ref_log_probs=True,
        padding_free=True,
        loss_type=["dpo_norm"],
        beta=5.0,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(config)
    return FalconDPOTrainer(
        model=model or FalconH1ForCausalLM.from_pretrained(base / "base"),
        args=DPOConfig(**settings),
        train_dataset=_dataset(rows or _rows(base)),
        processing_class=_tokenizer(base),
        ref_logps_cache_dir=cache,
        sync_free=sync_free,
    )


def run_dpo(base, out, *extra):
    argv = [
        "--model_name_or_path",
        str(base / "base"),
        "--output_dir",
        str(out),
        "--sources",
        json.dumps(
            [
                {
                    "path": str(base / "pairs.jsonl"),
                    "prompt_column": "prompt",
                    "language_column": "language",
                }
            ]
        ),
    ]
    return dpo.main(argv + COMMON + list(extra))


def _history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


@pytest.fixture
def count_models(monkeypatch):
    """Counts FalconH1ForCausalLM instances built while the test runs (a reference copy would be one more)."""
    built = []
    original = FalconH1ForCausalLM.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(FalconH1ForCausalLM, "__init__", counting_init)
    return built


def test_padding_free_dpo_log_probs_equal_padded(base, tmp_path):
    """fp32 CPU: the packed pairs give the padded log-probs within 1e-5, through TRL's fused LM head, and the
    model really ran one packed row of the real tokens, located by the collator on the host."""
    trainer = make_trainer(base, tmp_path, precompute_ref_log_probs=False)
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    assert batch["attention_mask"].float().mean() < 0.95, "the batch must contain padding"
    assert batch["real_token_index"].numel() == batch["attention_mask"].sum()  # found on the host by the collator
    shapes = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kw: shapes.append(tuple(args[0].shape[:2])), with_kwargs=True
    )
    results = {}
    for padding_free in (False, True):
        set_padding_free(model, padding_free)
        results[padding_free] = torch.cat(trainer.compute_ref_log_probs(model, batch))
    hook.remove()
    assert shapes == [tuple(batch["input_ids"].shape), (1, int(batch["attention_mask"].sum()))]
    assert rel_err(results[True], results[False]) < 1e-5
    # and both equal log-probs from our own logits (logit multiplier applied) — TRL's head misses nothing
    pairs = pairs_from_rows(_rows(base)[:8])
    ours = completion_logps(model, trainer.processing_class, pairs)[..., 0]  # (8, 2) summed log-probs
    assert rel_err(results[True], torch.cat([ours[:, 0], ours[:, 1]])) < 1e-5


def test_tiny_dpo_learns_without_a_reference_copy(base, tmp_path, count_models):
    """Full fine-tuning with precomputed reference log-probs: the loss starts at ln 2 and falls, reward accuracy on
    the training pairs rises, and no second model is built."""
    trainer = run_dpo(
        base,
        tmp_path / "full",
        "--max_steps",
        "24",
        "--learning_rate",
        "3e-3",
        "--padding_free",
        "True",
        "--precompute_ref_log_probs",
        "True",
    )
    losses, accuracy = _history(trainer, "loss"), _history(trainer, "rewards/accuracies")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert sum(losses[-4:]) / 4 < 0.5, losses
    assert sum(accuracy[-4:]) / 4 > sum(accuracy[:4]) / 4 + 0.25, accuracy
    assert len(count_models) == 1 and trainer.ref_model is None
    report = json.loads((tmp_path / "full" / "preference_mixture_report.json").read_text())
    assert report[0]["train_rows"] == 32 and report[0]["train_tokens"] > 32 * 20


def test_full_dpo_without_precompute_holds_a_reference_copy(base, tmp_path, count_models):
    """The contrast to the test above: the counter does see a reference copy when one is needed."""
    trainer = run_dpo(base, tmp_path / "ref", "--max_steps", "1", "--learning_rate", "1e-3")
    assert len(count_models) == 2 and trainer.ref_model is not None


def test_lora_dpo_reference_is_the_base_with_adapters_disabled(base, tmp_path, count_models):
    trainer = run_dpo(
        base,
        tmp_path / "lora",
        "--max_steps",
        "8",
        "--learning_rate",
        "1e-2",
        "--use_peft",
        "True",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--padding_free",
        "True",
    )
    assert len(count_models) == 1 and trainer.ref_model is None  # no second copy in memory
    losses = _history(trainer, "loss")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and min(losses[-3:]) < losses[0]
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    reference = torch.cat(trainer.compute_ref_log_probs(model, batch))  # adapters disabled
    fresh = FalconH1ForCausalLM.from_pretrained(base / "base").eval()  # the untouched starting model
    pairs = [trainer.train_dataset[i] for i in range(8)]  # the mixture shuffled the rows
    plain = completion_logps(fresh, trainer.processing_class, pairs)[..., 0]
    assert rel_err(reference, torch.cat([plain[:, 0], plain[:, 1]])) < 1e-5
    policy = model(
        **{k: batch[k] for k in ("input_ids", "attention_mask")},
        labels=batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
        fused_lm_head=True,
    )
    assert rel_err(policy.log_probs.sum(1).detach(), reference) > 1e-4  # the adapters did train


def test_reference_cache_is_reused_and_invalidated(base, tmp_path, monkeypatch):
    calls = []
    original = FalconDPOTrainer.compute_ref_log_probs

    def counting(self, model, inputs):
        calls.append(1)
        return original(self, model, inputs)

    monkeypatch.setattr(FalconDPOTrainer, "compute_ref_log_probs", counting)
    cache = tmp_path / "cache"

    def events(**kw):
        calls.clear()
        trainer = make_trainer(base, tmp_path / "out", cache=cache, **kw)
        return trainer.ref_cache_events[-1][1], len(calls), trainer.train_dataset["ref_chosen_logps"], trainer

    first, n_first, logps_first, trainer = events()
    longest_prompt = max(map(len, trainer.train_dataset["prompt_ids"]))
    assert (first, n_first > 0) == ("miss", True) and len(list(cache.glob("train-*.safetensors"))) == 1
    again, n_again, logps_again, _ = events()
    assert (again, n_again) == ("hit", 0) and logps_again == pytest.approx(logps_first, abs=0)
    assert events(beta=0.1)[0] == "hit"  # beta does not change reference log-probs
    assert events(max_length=longest_prompt + 1)[0] == "miss"  # truncating the completions does
    assert events(ld_alpha=0.5)[0] == "miss"
    assert events(padding_free=False)[0] == "miss"  # packed and padded differ at rounding level
    changed = FalconH1ForCausalLM.from_pretrained(base / "base")
    with torch.no_grad():
        changed.model.final_layernorm.weight.mul_(1.01)
    assert events(model=changed)[0] == "miss"  # other reference weights
    rows = _rows(base)
    rows[3] = {**rows[3], "rejected": str(int(rows[3]["rejected"]) + 5)}
    calls.clear()
    assert make_trainer(base, tmp_path / "out", rows=rows, cache=cache).ref_cache_events[-1][1] == "miss"
    assert events()[0] == "hit"  # the original entry is still there


def test_pairs_dropped_by_max_length_are_counted(base, tmp_path):
    rows = _rows(base)
    rows[1] = {**rows[1], "prompt": "What is " + "very " * 40 + "much?"}
    tokenizer = _tokenizer(base)
    prompts = [
        len(tokenizer.apply_chat_template(p["prompt"], add_generation_prompt=True)["input_ids"])
        for p in pairs_from_rows(rows)
    ]
    limit = sorted(prompts)[-2] + 2  # every prompt fits but the long one
    assert prompts[1] > limit
    trainer = make_trainer(base, tmp_path, rows=rows, max_length=limit, precompute_ref_log_probs=False)
    assert trainer.dropped_pairs == {"train": 1} and len(trainer.train_dataset) == len(rows) - 1
