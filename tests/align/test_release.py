"""align/release.py: every format loaded by the program that serves it — vanilla transformers (bf16), transformers +
bitsandbytes (NF4), llama.cpp (GGUF) — on one tiny model taught the offline chat tasks in a few seconds; the µP
multipliers survive the GGUF conversion (dropping any one is caught); llama.cpp tokenises like the Hugging Face
tokenizer, for the offline tokenizer and a Falcon-H1-style one; bad input fails cleanly."""

import json
import random

import gguf
import llama_cpp  # noqa: F401  (the release extra, which `make test` installs: a missing llama.cpp fails, never skips)
import pytest
import torch

from align import release
from align.eval import load_jsonl
from align.gguf_export import LLAMA3_SPLIT, MULTIPLIER_FIELDS, multipliers, pre_tokenizer_name, write_gguf
from align.offline.base import as_chat_tokenizer, build_tokenizer, pretrain
from align.offline.tasks import LANGUAGES, examples, pretraining_documents
from align.release_checks import GGUF_LOGIT_TOLERANCE, gguf_logit_error, load_gguf, prompts_of, tokenisation
from align.validate import InputError
from model import FalconH1ForCausalLM
from model.presets import _MUP_0_5B
from tests.conftest import MULTIPLIERS, randomize_, tiny_config_for

HELDOUT = load_jsonl("data/offline/heldout.jsonl")
N_PER_LANGUAGE = 10
GATED_NORM = dict(mamba_rms_norm=True, mamba_norm_before_gate=False)  # as every released Falcon-H1 with the norm


def heldout_subset(per_language=N_PER_LANGUAGE):
    seen, rows = {}, []
    for r in HELDOUT:
        if seen.get(r["language"], 0) < per_language:
            rows.append(r)
            seen[r["language"]] = seen.get(r["language"], 0) + 1
    return rows


def falcon_h1_style_tokenizer(texts, vocab_size=500):
    """Falcon-H1's tokenizer cannot be downloaded here, so one of its kind is trained offline: the Llama-3 split regex
    then byte-level BPE without a regex (the pre-tokenizer llama.cpp maps `falcon-h1` to), digits never merged (TII's
    tokenizers split digits: they are kept single while training, so the released vocabulary holds no multi-digit
    token), and Falcon-H1's special tokens at their ids (pad 0, BOS 1, EOS 11) plus ChatML's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<|pad|>", "<|begin_of_text|>"] + [f"<|reserved_{i}|>" for i in range(2, 11)]
    special += ["<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    return as_chat_tokenizer(tok)


def corpus():
    return pretraining_documents(300) + [m["content"] for r in examples("train") for m in r["messages"]]


def taught_model(tokenizer, steps=300, **overrides):
    """A 2-layer Falcon-H1 (0.5B's multipliers) trained for seconds on the chat-rendered training questions: it
    answers in the chat format with a number (arithmetic needs the pipeline's minutes). After 150 steps it still
    ended most replies at once, and empty replies that tie with a number flipped between formats."""
    config = tiny_config_for(tokenizer, hidden_size=64, intermediate_size=128,
                             **{**GATED_NORM, **_MUP_0_5B, **overrides})  # fmt: skip
    torch.manual_seed(0)
    model = FalconH1ForCausalLM(config)
    rows = list(examples("train"))
    random.Random(0).shuffle(rows)
    docs = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows[:3000]]
    token_docs = [tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for d in docs]
    pretrain(model, token_docs, steps, batch=16, width=128, lr=1e-2, log_every=10**6)
    return model.eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tokenizer = build_tokenizer(corpus(), vocab_size=500)
    path = tmp_path_factory.mktemp("source") / "instruct"
    model = taught_model(tokenizer)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    path, _, _ = source
    out = tmp_path_factory.mktemp("release") / "release"
    manifest = release.build(path, out, heldout_rows=heldout_subset())
    return out, manifest


# ----------------------------------------------------------------------------------------------- the release
def test_every_format_is_written_and_loads_where_it_is_served(built):
    out, manifest = built
    assert sorted(manifest["formats"]) == sorted(release.FORMATS)
    for info in manifest["formats"].values():
        assert (out / info["file"]).exists() and info["bytes"] > 0
    checks = manifest["checks"]
    assert checks["problems"] == [], checks["problems"]
    table = {f: (r["agreement"], r["exact_match"]) for f, r in checks["formats"].items()}
    print("\nformat: (answers equal ours, exact match)", table, "ours:", checks["ours"]["exact_match"])
    assert checks["ours"]["n"] == len(LANGUAGES) * N_PER_LANGUAGE
    # the release's thresholds, stated here again so a loosened threshold shows up in review
    assert checks["formats"]["gguf-f16"]["agreement"] >= 0.98
    assert checks["formats"]["gguf-q8_0"]["agreement"] >= 0.95
    for four_bit in ("gguf-q4_0", "gguf-q4_k_m", "nf4"):
        assert checks["formats"]["bf16"]["exact_match"] - checks["formats"][four_bit]["exact_match"] <= 0.05
    assert checks["transformers_logits"]["class"].startswith("transformers.models.falcon_h1.")
    assert checks["transformers_logits"]["vs_ours_same_weights"] < 1e-4
    assert checks["transformers_logits"]["vs_ours_source_weights"] < 3e-2  # bf16 rounding of the weights
    for fmt in ("gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k_m"):
        assert checks["formats"][fmt]["tokenisation_equal"] == 1.0
    assert checks["formats"]["gguf-f16"]["logit_error"] < GGUF_LOGIT_TOLERANCE["F16"]


def test_bf16_layout_stop_tokens_and_template(built, source):
    out, _ = built
    _, _, tokenizer = source
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "falcon_h1" and config["architectures"] == ["FalconH1ForCausalLM"]
    assert config["dtype"] == "bfloat16"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == sorted([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(out)
    assert "{% generation %}" not in served.chat_template and "{% generation %}" in tokenizer.chat_template
    chat = [{"role": "user", "content": "What is 2 plus 3?"}]
    render = dict(add_generation_prompt=True, tokenize=False)
    assert served.apply_chat_template(chat, **render) == tokenizer.apply_chat_template(chat, **render)


def test_nf4_keeps_lm_head_and_out_proj_unquantised(built):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    out, _ = built
    model = AutoModelForCausalLM.from_pretrained(out / "nf4")
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds["lm_head"] is torch.nn.Linear
    assert kinds["model.layers.0.mamba.out_proj"] is torch.nn.Linear
    assert issubclass(kinds["model.layers.0.mamba.in_proj"], bnb.nn.Linear4bit)
    assert issubclass(kinds["model.layers.1.feed_forward.down_proj"], bnb.nn.Linear4bit)
    assert json.loads((out / "nf4" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_gguf_metadata_records_every_multiplier_and_the_pre_tokenizer(built, source):
    out, manifest = built
    _, model, _ = source
    reader = gguf.GGUFReader(out / manifest["formats"]["gguf-q8_0"]["file"])
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.architecture"] == "falcon-h1"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["falcon-h1.mup.folded"] is True
    for key, value in multipliers(model.config).items():
        assert fields[f"falcon-h1.mup.{key}"] == pytest.approx(value, rel=1e-6), key
    names = {t.name for t in reader.tensors}
    assert {"blk.0.ffn_norm", "blk.1.ssm_in.weight", "blk.0.ssm_norm.weight", "output.weight"} <= names


def test_llama_cpp_chats_with_the_template_in_the_file(built, source):
    """llama-cpp-python's chat API renders the GGUF's own template and stops at <|im_end|>: the reply equals ours."""
    from align.eval import generate_replies

    out, manifest = built
    _, model, tokenizer = source
    row = heldout_subset(1)[0]
    llm = load_gguf(out / manifest["formats"]["gguf-f16"]["file"])
    reply = llm.create_chat_completion(messages=row["messages"][:1], max_tokens=8, temperature=0.0)
    ours = generate_replies(model, tokenizer, [row["messages"][:1]])[0]
    assert reply["choices"][0]["message"]["content"].strip() == ours.strip() != ""


def test_card_is_written_from_the_records(built):
    out, manifest = built
    card = (out / "README.md").read_text()
    for section in ("## Training", "## Evaluation", "## Formats", "## Intended use", "## Limitations", "## License"):
        assert section in card
    assert card.count("| gguf-") == 5 and "| nf4 |" in card and "| bf16 |" in card
    f16 = manifest["checks"]["formats"]["gguf-f16"]
    assert f"{f16['agreement']:.1%}" in card


# ----------------------------------------------------------------------------------------------- multipliers
def test_folded_weights_compute_our_model_with_every_multiplier_one():
    """The fold itself, in torch: the folded tensors in a model whose multipliers are all 1 give the original
    logits (what llama.cpp's graph computes, minus its precision)."""
    from align.gguf_export import fold_multipliers

    tokenizer = build_tokenizer(corpus()[:200], vocab_size=300)
    config = tiny_config_for(tokenizer, **GATED_NORM, **MULTIPLIERS)
    torch.manual_seed(0)
    model = randomize_(FalconH1ForCausalLM(config)).eval()
    ones = {k: ([1.0] * len(v) if isinstance(v, list) else 1.0) for k, v in multipliers(config).items()}
    plain = FalconH1ForCausalLM(tiny_config_for(tokenizer, **GATED_NORM, **ones)).eval()
    plain.load_state_dict(fold_multipliers(model.state_dict(), config))
    ids = torch.randint(0, config.vocab_size, (2, 19))
    with torch.no_grad():
        want, got = model(ids).logits, plain(ids).logits
    assert (got - want).abs().max() / want.abs().max() < 1e-5
    plain.load_state_dict(
        fold_multipliers(model.state_dict(), config, mup={**multipliers(config), "key_multiplier": 1})
    )
    with torch.no_grad():
        assert (plain(ids).logits - want).abs().max() / want.abs().max() > 1e-2


def test_dropping_any_multiplier_in_the_conversion_is_caught(tmp_path):
    """All nine multipliers ≠ 1 (14 numbers); with the right ones llama.cpp gives our logits within F16 precision,
    with any one of them left out (set to 1, as a converter that ignores it does) the check fails."""
    tokenizer = build_tokenizer(corpus()[:400], vocab_size=300)
    config = tiny_config_for(tokenizer, **GATED_NORM, **MULTIPLIERS)
    torch.manual_seed(0)
    model = randomize_(FalconH1ForCausalLM(config)).eval()
    ids = tokenizer(prompts_of(heldout_subset(1)[:2], tokenizer)[1], add_special_tokens=False)["input_ids"]
    tolerance = GGUF_LOGIT_TOLERANCE["F16"]

    def error(mup=None):
        path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "F16", mup=mup)
        return gguf_logit_error(load_gguf(path), model, ids)

    right = error()
    assert right < tolerance / 3, right
    errors = {}
    for field in MULTIPLIER_FIELDS:
        value = multipliers(config)[field]
        for i in range(len(value)) if isinstance(value, list) else [None]:
            dropped = multipliers(config)
            if i is None:
                dropped[field] = 1.0
            else:
                dropped[field][i] = 1.0
            errors[f"{field}[{i}]" if i is not None else field] = error(dropped)
    assert len(errors) == 14
    caught = {name: e for name, e in errors.items() if e > tolerance}
    assert caught.keys() == errors.keys(), {k: f"{v:.1e}" for k, v in errors.items()}


# ----------------------------------------------------------------------------------------------- tokenisation
@pytest.mark.parametrize("kind", ["offline", "falcon-h1-style"])
def test_llama_cpp_tokenises_heldout_prompts_like_hugging_face(kind, tmp_path):
    tokenizer = build_tokenizer(corpus(), 500) if kind == "offline" else falcon_h1_style_tokenizer(corpus())
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    assert pre_tokenizer_name(data) == {"offline": "gpt-2", "falcon-h1-style": "falcon-h1"}[kind]
    model = FalconH1ForCausalLM(tiny_config_for(tokenizer, **GATED_NORM)).eval()
    llm = load_gguf(write_gguf(model, tokenizer, tmp_path / "t.gguf", "F16"))
    texts = prompts_of(HELDOUT, tokenizer) + [r["messages"][0]["content"] for r in HELDOUT]
    texts += ["  two  spaces, trailing \n\n new-lines\tand tabs 1234567 ", "It's we'll l'été 3.14159 — ½"]
    result = tokenisation(llm, tokenizer, texts)
    assert result["n"] == 2 * len(HELDOUT) + 2
    assert result["equal"] == result["n"], result["mismatches"]
    if kind == "falcon-h1-style":  # digits stay single, as in Falcon-H1's tokenizer
        assert len(tokenizer("1234567", add_special_tokens=False)["input_ids"]) == 7


def test_unknown_pre_tokenizer_is_refused():
    with pytest.raises(ValueError, match="pre-tokenizer .*Whitespace.* is not one this writer can name"):
        pre_tokenizer_name({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Whitespace"}})


# ----------------------------------------------------------------------------------------------- bad input
def test_existing_output_is_refused_and_kept(source, tmp_path):
    path, _, _ = source
    out = tmp_path / "rel"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match=r"rel exists; pass --overwrite"):
        release.build(path, out, ["bf16"])
    assert (out / "mine.txt").read_text() == "keep"
    release.build(path, out, ["bf16"], overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel"]


def test_missing_tokenizer_and_unknown_format(source, tmp_path):
    path, model, _ = source
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    with pytest.raises(InputError, match=r"tokenizer: no tokenizer \(tokenizer.json\) in .*bare; pass --tokenizer"):
        release.build(bare, tmp_path / "out", ["bf16"])
    with pytest.raises(InputError, match=r"formats: unknown format\(s\) \['gguf-q3'\]; known: bf16, nf4"):
        release.build(path, tmp_path / "out", ["bf16", "gguf-q3"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare"]


def test_a_failure_mid_build_leaves_nothing(source, tmp_path):
    """bf16 is written, then the GGUF writer refuses the config: no release, no partial folder."""
    path, model, tokenizer = source
    odd = tmp_path / "odd"
    model.config.mamba_norm_before_gate = True
    try:
        model.save_pretrained(odd)
    finally:
        model.config.mamba_norm_before_gate = False
    tokenizer.save_pretrained(odd)
    with pytest.raises(InputError, match="mamba_norm_before_gate=true"):
        release.build(odd, tmp_path / "out", ["bf16", "gguf-f16"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd"]


def _adapter(base_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = FalconH1ForCausalLM.from_pretrained(base_path)
    peft = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "in_proj", "down_proj"], init_lora_weights=False)
    )
    peft.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", peft


def test_adapter_is_merged(source, tmp_path):
    path, _, tokenizer = source
    adapter, peft = _adapter(path, tmp_path)
    release.build(adapter, tmp_path / "out", ["bf16"], base=path)
    merged = FalconH1ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.tensor([tokenizer("What is 2 plus 3?")["input_ids"]])
    with torch.no_grad():
        want, got = peft(ids).logits, merged(ids).logits
    assert (got - want).abs().max() / want.abs().max() < 2e-2  # bf16 weights
    assert not torch.allclose(FalconH1ForCausalLM.from_pretrained(path)(ids).logits, want, atol=1e-3)  # LoRA changed it


def test_adapter_on_a_different_base_is_refused(source, tmp_path):
    path, _, tokenizer = source
    adapter, _ = _adapter(path, tmp_path)
    other = tmp_path / "other"
    FalconH1ForCausalLM(tiny_config_for(tokenizer, hidden_size=48, **GATED_NORM)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(
        InputError,
        match=r"base: .*down_proj.lora_A.weight was trained on a base whose .*down_proj has 128 inputs; the base .*other has 64: not its base",
    ):
        release.build(adapter, tmp_path / "out", ["bf16"], base=other)
    assert not (tmp_path / "out").exists()


def test_help_documents_every_format(capsys):
    with pytest.raises(SystemExit):
        release.main(["--help"])
    text = capsys.readouterr().out
    for fmt in release.FORMATS:
        assert f"\n  {fmt} " in text, fmt
