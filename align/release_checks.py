"""Each release format checked by the program that will load it.

- bf16: vanilla transformers (`AutoModelForCausalLM`, transformers' own Falcon-H1) gives our logits on the same
  weights, and greedy answers;
- nf4: vanilla transformers with bitsandbytes loads it and answers;
- GGUF: llama.cpp (llama-cpp-python) tokenises the held-out prompts to the Hugging Face tokenizer's ids, gives our
  logits within its precision, and answers greedily.

Answers are the greedy replies (up to `max_new_tokens`, stopping at `<|im_end|>` or EOS) to the held-out questions
through the chat template; "agreement" is the share equal to our model's reply on the source weights, "exact match"
the share whose first line equals the answer (align/eval.py's metric).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch

from .eval import generate_replies, stop_ids

# thresholds of a release (answers agree with ours; the 4-bit variants' exact match near bf16's)
# BF16 is reported, not held to an agreement: its 8-bit mantissa flips near-tied greedy answers of a tiny model
# against our fp32 (as the bf16 safetensors do in transformers); its logits are still bounded below, with every GGUF's
MIN_AGREEMENT = {"gguf-f16": 0.98, "gguf-q8_0": 0.95}
MAX_EM_DROP_4BIT = 0.05
FOUR_BIT = ("gguf-q4_0", "gguf-q4_k_m", "nf4")
# largest |Δ logit| of a GGUF against our fp32 logits, relative to the largest |logit|: F16 weights give ~1e-3
GGUF_LOGIT_TOLERANCE = {"F32": 1e-3, "F16": 1e-2, "BF16": 3e-2}


def prompts_of(rows, tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False) for r in rows]


def first_line(reply: str) -> str:
    return reply.strip().split("\n")[0].strip()


# ----------------------------------------------------------------------------------------------- transformers
@torch.no_grad()
def transformers_logits(release_dir, ours, ids: torch.Tensor) -> dict:
    """Vanilla transformers on the release vs our model: both in fp32 on the release's bf16 weights (the same
    numbers: only the implementations differ), and against `ours` on its source weights (bf16 rounding)."""
    from transformers import AutoModelForCausalLM

    from model import FalconH1ForCausalLM

    vanilla = AutoModelForCausalLM.from_pretrained(release_dir, dtype=torch.float32).eval()
    same_weights = FalconH1ForCausalLM.from_pretrained(release_dir, dtype=torch.float32).eval()
    got = vanilla(ids).logits.double()
    scale = got.abs().max().item()
    return {
        "class": f"{type(vanilla).__module__}.{type(vanilla).__name__}",
        "vs_ours_same_weights": (got - same_weights(ids).logits.double()).abs().max().item() / scale,
        "vs_ours_source_weights": (got - ours.float()(ids).logits.double()).abs().max().item() / scale,
    }


def load_transformers(path):
    """Vanilla transformers' AutoModelForCausalLM (bnb-quantised where the config says so), for inference on CPU."""
    from transformers import AutoModelForCausalLM

    return cpu_safe_4bit(AutoModelForCausalLM.from_pretrained(path).eval())


def cpu_safe_4bit(model):
    """bitsandbytes (0.50) repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first no-grad forward and
    fails there unless the output width is a multiple of 32 and the input width of the quantisation block (64).
    Falcon-H1's in_proj has 2·d_ssm + 2·G·N + H outputs (3352 for the 0.5B), so such layers use bitsandbytes'
    generic 4-bit path instead. GPUs are unaffected."""
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        block = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64)
        if module.out_features % 32 or module.in_features % block:
            module.support_avx512bf16_for_cpu = False
    return model


def transformers_replies(path, tokenizer, rows, max_new_tokens=8) -> list[str]:
    model = load_transformers(path)
    return generate_replies(model, tokenizer, [r["messages"][:-1] for r in rows], max_new_tokens=max_new_tokens)


# ----------------------------------------------------------------------------------------------- llama.cpp
@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs model loading to fd 2 even with verbose=False in some builds; keep test output readable."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _no_weight_repacking():
    """llama.cpp repacks quantised weights for its CPU kernels (its "extra buffer types"); in llama-cpp-python 0.3.36
    that crashes (segfault in decode) on the Q8_0/Q4 files of the small Falcon-H1 models tested here, while the same
    files run with repacking off (llama-cli: --no-repack). `Llama()` takes no argument for it, so its default
    model parameters are patched while it loads. Repacking changes speed only, never the numbers."""
    import llama_cpp.llama as module

    original = module.llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_cpp.llama_model_default_params = original


def load_gguf(path, n_ctx: int = 512):
    import llama_cpp

    with _quiet_stderr(), _no_weight_repacking():
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, logits_all=True, verbose=False, seed=0
        )


def tokenisation(llm, tokenizer, texts) -> dict:
    """llama.cpp's token ids of each text (special tokens parsed, no BOS added) vs the HF tokenizer's."""
    mismatches = []
    for text in texts:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if list(ours) != list(theirs):
            mismatches.append({"text": text, "hf": list(ours), "llama.cpp": list(theirs)})
    return {"n": len(texts), "equal": len(texts) - len(mismatches), "mismatches": mismatches[:3]}


def gguf_logits(llm, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) logits of llama.cpp for one sequence."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


@torch.no_grad()
def gguf_logit_error(llm, model, ids: list[int]) -> float:
    """max |llama.cpp logits − our fp32 logits| / max |ours|, over every position of `ids`."""
    ours = model.float()(torch.tensor([ids])).logits[0].double().numpy()
    return float(np.abs(gguf_logits(llm, ids) - ours).max() / np.abs(ours).max())


def gguf_replies(llm, prompts_ids: list[list[int]], stops, max_new_tokens=8) -> list[str]:
    """Greedy replies of llama.cpp: the argmax of its logits each step, until a stop id."""
    replies = []
    for ids in prompts_ids:
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token in stops:
                break
            out.append(token)
            llm.eval([token])
        replies.append(llm.detokenize(out).decode("utf-8", errors="replace"))
    return replies


def gguf_checks(paths: dict, tokenizer_dir, prompts, stops, probe_ids, max_new_tokens=8) -> dict:
    """{format: GGUF path} → {format: {tokenisation, replies, probe_logits}}, computed by llama.cpp in one fresh
    process: llama.cpp's threads never share a process with torch's and bitsandbytes' (a segfault inside llama.cpp's
    decode was seen after they had run in the same process), and a crash becomes an error naming the files."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(_gguf_checks, paths, str(tokenizer_dir), prompts, sorted(stops), probe_ids, max_new_tokens)
        try:
            return job.result()
        except BrokenProcessPool as e:
            raise RuntimeError(f"llama.cpp crashed while checking {sorted(paths.values())}") from e


def _gguf_checks(paths, tokenizer_dir, prompts, stops, probe_ids, max_new_tokens) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    for fmt, path in paths.items():
        llm = load_gguf(path)
        prompt_ids = [llm.tokenize(p.encode("utf-8"), add_bos=False, special=True) for p in prompts]
        out[fmt] = {
            "tokenisation": tokenisation(llm, tokenizer, prompts),
            "replies": gguf_replies(llm, prompt_ids, set(stops), max_new_tokens),
            "probe_logits": gguf_logits(llm, probe_ids),
        }
        llm.close()
    return out


# ----------------------------------------------------------------------------------------------- one release
def score(replies, reference, rows) -> dict:
    agree = sum(first_line(a) == first_line(b) for a, b in zip(replies, reference))
    hits = sum(first_line(a) == r["answer"] for a, r in zip(replies, rows))
    return {"agreement": agree / len(rows), "exact_match": hits / len(rows), "n": len(rows)}


@torch.no_grad()
def check_release(release_dir, source_model, tokenizer, rows, manifest: dict, max_new_tokens=8) -> dict:
    """Every format in `manifest["formats"]` → {format: {loaded_by, agreement, exact_match, ...}}, plus the
    transformers logits check and llama.cpp's tokenisation of the prompts."""
    release_dir = Path(release_dir)
    source_model = source_model.float().eval()
    conversations = [r["messages"][:-1] for r in rows]
    ours = generate_replies(source_model, tokenizer, conversations, max_new_tokens=max_new_tokens)
    prompts = prompts_of(rows, tokenizer)
    probe = torch.tensor([tokenizer(prompts[0], add_special_tokens=False)["input_ids"]])
    distinct = len({first_line(r) for r in ours})
    result = {"ours": {**score(ours, ours, rows), "distinct_answers": distinct}, "formats": {}}
    result["transformers_logits"] = transformers_logits(release_dir, source_model, probe)
    result["formats"]["bf16"] = {
        "loaded_by": "transformers AutoModelForCausalLM",
        **score(transformers_replies(release_dir, tokenizer, rows, max_new_tokens), ours, rows),
    }
    if "nf4" in manifest["formats"]:
        result["formats"]["nf4"] = {
            "loaded_by": "transformers + bitsandbytes",
            **score(transformers_replies(release_dir / "nf4", tokenizer, rows, max_new_tokens), ours, rows),
        }
    ggufs = {f: str(release_dir / info["file"]) for f, info in manifest["formats"].items() if f.startswith("gguf-")}
    llama = gguf_checks(ggufs, release_dir, prompts, stop_ids(tokenizer), probe[0].tolist(), max_new_tokens)
    ours_probe = source_model(probe).logits[0].double().numpy()
    for fmt, got in llama.items():
        result["formats"][fmt] = {
            "loaded_by": "llama.cpp (llama-cpp-python)",
            **score(got["replies"], ours, rows),
            "logit_error": float(np.abs(got["probe_logits"] - ours_probe).max() / np.abs(ours_probe).max()),
            "tokenisation_equal": got["tokenisation"]["equal"] / got["tokenisation"]["n"],
        }
        if got["tokenisation"]["mismatches"]:
            result["formats"][fmt]["tokenisation_mismatches"] = got["tokenisation"]["mismatches"]
    result["problems"] = problems(result)
    return result


def problems(result: dict) -> list[str]:
    """The release's promises; each broken one is a line."""
    out = []
    formats = result["formats"]
    logits = result["transformers_logits"]
    if logits["vs_ours_same_weights"] > 1e-4:
        out.append(f"transformers' logits differ from ours on the same weights by {logits['vs_ours_same_weights']:.2e}")
    for fmt, minimum in MIN_AGREEMENT.items():
        if fmt in formats and formats[fmt]["agreement"] < minimum:
            out.append(f"{fmt}: answers agree with ours on {formats[fmt]['agreement']:.1%} < {minimum:.0%}")
    for fmt in FOUR_BIT:
        if fmt in formats:
            drop = formats["bf16"]["exact_match"] - formats[fmt]["exact_match"]
            if drop > MAX_EM_DROP_4BIT:
                out.append(f"{fmt}: exact match {drop:.1%} below bf16 (allowed {MAX_EM_DROP_4BIT:.0%})")
    for fmt, info in formats.items():
        if info.get("tokenisation_equal", 1.0) < 1.0:
            out.append(f"{fmt}: llama.cpp tokenises {1 - info['tokenisation_equal']:.1%} of the prompts differently")
    return out
