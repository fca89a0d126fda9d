"""Tiny SFT end to end through align/sft.py and TRL: learning, LoRA, merging, packing, export (resume:
test_resume.py)."""

import json

import pytest
import torch

from align import sft
from align.offline.tasks import examples
from model import FalconH1ForCausalLM
from model.settings import overridden
from tests.align.helpers import CPU_TRAINING, make_tiny_base
from tests.conftest import rel_err

COMMON = CPU_TRAINING + [
    "--per_device_train_batch_size",
    "4",
    "--max_length",
    "128",
    "--assistant_only_loss",
    "True",
    "--dataloader_num_workers",
    "0",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Falcon-H1 'base' checkpoint with the project's tokenizer, plus a small jsonl mix."""
    root = tmp_path_factory.mktemp("sft")
    make_tiny_base(root / "base")
    rows = [r for r in examples("train") if r["language"] in ("en", "fr", "de")][::9][:48]
    (root / "mix.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return root


def run_sft(base, out, *extra):
    argv = [
        "--model_name_or_path",
        str(base / "base"),
        "--output_dir",
        str(out),
        "--sources",
        json.dumps([{"path": str(base / "mix.jsonl"), "language_column": "language"}]),
    ]
    return sft.main(argv + COMMON + list(extra))


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_full_sft_learns_updates_every_parameter_and_exports(base, tmp_path):
    before = _state(FalconH1ForCausalLM.from_pretrained(base / "base"))
    trainer = run_sft(base, tmp_path / "full", "--max_steps", "15", "--learning_rate", "1e-2")
    losses = _losses(trainer)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    after = _state(trainer.model)
    unchanged = [k for k, p in trainer.model.named_parameters() if torch.equal(after[k], before[k])]
    assert not unchanged, unchanged
    # the saved checkpoint loads in vanilla transformers with the same logits
    from transformers import AutoModelForCausalLM

    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    ours = FalconH1ForCausalLM.from_pretrained(tmp_path / "full").eval()
    ids = torch.randint(3, 300, (2, 17))
    with torch.no_grad():
        assert rel_err(vanilla(ids).logits, ours(ids).logits) < 1e-5
    report = json.loads((tmp_path / "full" / "mixture_report.json").read_text())
    assert report[0]["train_rows"] == 48
    # the report counts real tokens: the chat-templated length of every row
    tokenizer = trainer.processing_class
    rows = [json.loads(line) for line in (base / "mix.jsonl").read_text().splitlines()]
    expected = sum(len(tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows)
    assert report[0]["train_tokens"] == expected > 10 * len(rows)


def test_lora_trains_only_adapters_and_merge_equals_adapter_outputs(base, tmp_path):
    before = _state(FalconH1ForCausalLM.from_pretrained(base / "base"))
    trainer = run_sft(
        base,
        tmp_path / "lora",
        "--max_steps",
        "6",
        "--learning_rate",
        "1e-2",
        "--use_peft",
        "True",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--merge_lora",
        "True",
    )
    peft_model = trainer.model.eval()
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".mamba.in_proj.lora_A" in n for n in trainable)  # the SSM gets adapters too
    base_now = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in peft_model.state_dict().items()
        if "lora_" not in k
    }
    assert all(torch.equal(base_now[k], before[k]) for k in before)  # frozen weights untouched
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # adapters moved off their zero init
    merged = FalconH1ForCausalLM.from_pretrained(tmp_path / "lora" / "merged").eval()
    ids = torch.randint(3, 300, (2, 13))
    with torch.no_grad():
        assert rel_err(merged(ids).logits, peft_model(input_ids=ids).logits) < 1e-5


def test_lora_on_out_proj_is_refused_with_a_reason(base, tmp_path):
    with pytest.raises(ValueError, match=r"out_proj.*refused.*fused"):
        run_sft(
            base,
            tmp_path / "bad",
            "--max_steps",
            "1",
            "--use_peft",
            "True",
            "--lora_target_modules",
            "q_proj",
            "out_proj",
        )


def test_packed_and_padded_first_step_have_the_same_loss(base, tmp_path):
    """All 48 rows in one step: one packed row (padding-free) vs a padded batch of 48 — same loss."""
    common = ["--max_steps", "1", "--learning_rate", "1e-9"]
    packed = run_sft(
        base,
        tmp_path / "packed",
        *common,
        "--packing",
        "True",
        "--max_length",
        "4096",
        "--per_device_train_batch_size",
        "1",
    )
    padded = run_sft(base, tmp_path / "padded", *common, "--packing", "False", "--per_device_train_batch_size", "48")
    lp, lu = _losses(packed)[0], _losses(padded)[0]
    assert abs(lp - lu) / lu < 1e-4, (lp, lu)


def test_compile_layers_trains_like_eager(base, tmp_path):
    """`compile_layers: true` through the script, with activation checkpointing on as the GPU recipes have it: packed
    padding-free batches run through the compiled layers (aot_eager here: dynamo and AOT autograd as on a GPU,
    without inductor's CPU compile time) — the whole layer traced, not a graph-broken shell around the checkpoint —
    and after three steps every weight equals the eager run's, and training moved them. Varying lengths:
    test_kernels.py."""
    common = ["--max_steps", "3", "--learning_rate", "1e-3", "--packing", "True", "--max_length", "512"]
    eager = run_sft(base, tmp_path / "eager", *common)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runtime = '{"compile_backend": "aot_eager"}'  # a recipe's `runtime:` mapping (model.settings)
    with overridden():
        compiled = run_sft(
            base, tmp_path / "compiled", *common, "--compile_layers", "True", "--gradient_checkpointing", "True",
            "--runtime", runtime,
        )  # fmt: skip
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] > 100  # the layers' ops, traced
    got, want = _state(compiled.model), _state(eager.model)
    for name, value in want.items():
        assert rel_err(got[name], value) < 1e-4, name
    before = _state(FalconH1ForCausalLM.from_pretrained(base / "base"))
    assert any(rel_err(value, before[name]) > 1e-3 for name, value in want.items())


CHATS = [  # a system turn and two or three exchanges each
    [
        {"role": "system", "content": "Answer with the number only."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "The answer is 5."},
        {"role": "user", "content": "And 4 plus 4?"},
        {"role": "assistant", "content": "8"},
    ],
    [
        {"role": "system", "content": "You count letters."},
        {"role": "user", "content": "How many letters in cat?"},
        {"role": "assistant", "content": "There are 3."},
        {"role": "user", "content": "In house?"},
        {"role": "assistant", "content": "5 letters."},
        {"role": "user", "content": "In a?"},
        {"role": "assistant", "content": "1"},
    ],
]


def _laid_out(tokenizer, messages) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """A conversation in the Falcon-H1 chat layout, tokenized piece by piece (pieces meet at special tokens and after
    newlines, where byte-level BPE never merges) → (ids, trained): trained are each assistant reply and its
    <|im_end|>, nothing else."""
    pieces = [(tokenizer.bos_token, False)]
    for m in messages:
        if m["role"] == "assistant":
            pieces += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    ids, trained = [], []
    for text, train in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trained += [train] * len(piece)
    return tuple(ids), tuple(trained)


def _documents(batch) -> list[tuple[tuple[int, ...], tuple[bool, ...]]]:
    """A collated batch → (ids, trained) per document: packed rows split where position_ids restart, padded rows
    cut to their attention mask; trained = label not -100."""
    docs = []
    for b, (ids, labels) in enumerate(zip(batch["input_ids"].tolist(), batch["labels"].tolist())):
        if "attention_mask" in batch:
            real = batch["attention_mask"][b].bool().tolist()
            ids, labels = [t for t, r in zip(ids, real) if r], [t for t, r in zip(labels, real) if r]
            bounds = [0, len(ids)]
        else:
            bounds = [i for i, p in enumerate(batch["position_ids"][b].tolist()) if p == 0] + [len(ids)]
        for start, end in zip(bounds, bounds[1:]):
            docs.append((tuple(ids[start:end]), tuple(label != -100 for label in labels[start:end])))
    return docs


@pytest.mark.parametrize("packing", [False, True])
def test_assistant_only_loss_trains_exactly_the_replies_and_their_end_tokens(base, tmp_path, monkeypatch, packing):
    """Multi-turn chats through the script (the Falcon-H1 template's {% generation %} markers, TRL's assistant masks
    and collator): the labels the loss sees are set on every assistant reply and its <|im_end|>, and on no system,
    user, role-header, newline or BOS token."""
    from align.sft_trainer import FalconSFTTrainer

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c, "language": "en"}) + "\n" for c in CHATS))
    batches = []
    compute_loss = FalconSFTTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        batches.append({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(FalconSFTTrainer, "compute_loss", spy)
    argv = ["--model_name_or_path", str(base / "base"), "--output_dir", str(tmp_path / "out"), "--sources"]
    argv += [json.dumps([{"path": str(data), "language_column": "language"}]), *COMMON, "--max_length", "512"]
    trainer = sft.main(argv + ["--chat_template", "falcon_h1", "--packing", str(packing), "--max_steps", "1"])

    tokenizer = trainer.processing_class
    expected = sorted(_laid_out(tokenizer, c) for c in CHATS)
    assert sum(sum(trained) for _, trained in expected) > 20  # the replies span many tokens
    got = sorted(d for batch in batches for d in _documents(batch))
    assert [ids for ids, _ in got] == [ids for ids, _ in expected]  # each chat trained once, in the layout above
    for (ids, trained), (_, want) in zip(got, expected):
        wrong = [(tokenizer.decode(t), a) for t, a, b in zip(ids, trained, want) if a != b]
        assert trained == want, f"(token, trained) that should be the other way: {wrong}"
