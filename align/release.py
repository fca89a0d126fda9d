"""The aligned model as a release: merged bf16 safetensors, bitsandbytes NF4, GGUF for llama.cpp and a model card.

    python -m align.release --model runs/offline/dpo --out runs/offline/release [--formats bf16,gguf-f16,...]
        [--base DIR] [--tokenizer DIR] [--run runs/offline] [--check] [--overwrite]

--model is a checkpoint, or a LoRA adapter (adapter_config.json) that is merged into its base (--base, else the
base the adapter records). The release is built in a temporary folder next to --out and renamed into place when
complete: an existing --out is refused unless --overwrite, and a failure leaves nothing behind.

Formats (--formats, comma-separated; default: all):
  bf16         merged weights as bf16 safetensors in Hugging Face's layout, the tokenizer with the chat template,
               generation_config.json with the stop tokens. Vanilla transformers loads it. Always written.
  nf4          nf4/: bitsandbytes 4-bit NF4 (double quantisation, bf16 compute) saved by transformers; lm_head
               (µP-scaled logits) and Mamba's out_proj stay bf16, as in the QLoRA recipes. Needs bitsandbytes.
  gguf-f16     gguf/<name>-F16.gguf for llama.cpp: Falcon-H1 architecture, µP multipliers folded into the weights
               (and recorded under falcon-h1.mup.*), tokenizer with its pre-tokenizer declared, chat template.
  gguf-bf16    the same in BF16.
  gguf-q8_0    8-bit, quantised from the F16 file by llama.cpp's own quantiser.
  gguf-q4_0    4-bit (blocks of 32), by llama.cpp's quantiser.
  gguf-q4_k_m  llama.cpp's 4-bit K-quant mix; rows narrower than 256 fall back to 5-bit Q5_0 (tiny models).

--check answers the held-out questions (--heldout) with every format, loaded by the program that serves it
(transformers, transformers + bitsandbytes, llama.cpp), writes checks.json and the format table into the card, and
exits 1 when a threshold of align/release_checks.py fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .gguf_export import GGUFExportError, quantize, serving_chat_template, write_gguf
from .model_card import CardFacts, write_card
from .validate import InputError

FORMATS = {
    "bf16": "merged bf16 safetensors, Hugging Face layout (always written)",
    "nf4": "bitsandbytes 4-bit NF4 in nf4/, lm_head and Mamba out_proj unquantised",
    "gguf-f16": "GGUF F16, µP multipliers folded",
    "gguf-bf16": "GGUF BF16, µP multipliers folded",
    "gguf-q8_0": "GGUF Q8_0 by llama.cpp's quantiser",
    "gguf-q4_0": "GGUF Q4_0 by llama.cpp's quantiser",
    "gguf-q4_k_m": "GGUF Q4_K_M by llama.cpp's quantiser",
}
GGUF_TYPES = {"gguf-f16": "F16", "gguf-bf16": "BF16", "gguf-q8_0": "Q8_0", "gguf-q4_0": "Q4_0", "gguf-q4_k_m": "Q4_K_M"}
TOKENIZER_FILES = ("tokenizer.json",)


# ----------------------------------------------------------------------------------------------- inputs
def parse_formats(formats) -> list[str]:
    names = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = [f for f in names if f not in FORMATS]
    if unknown:
        raise InputError(f"unknown format(s) {unknown}; known: {', '.join(FORMATS)}", "formats")
    return ["bf16"] + [f for f in FORMATS if f in names and f != "bf16"]


def tokenizer_dir(model_dir: Path, tokenizer: str | None, base: Path | None) -> Path:
    candidates = [Path(tokenizer)] if tokenizer else [model_dir] + ([base] if base else [])
    for folder in candidates:
        if all((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    where = " or ".join(str(c) for c in candidates)
    raise InputError(f"no tokenizer (tokenizer.json) in {where}; pass --tokenizer DIR", "tokenizer")


def load_source(model_dir, base=None, tokenizer=None):
    """→ (our FalconH1ForCausalLM with any LoRA adapter merged, the tokenizer, a description of the source)."""
    from transformers import AutoTokenizer

    from model import FalconH1ForCausalLM

    from .models import check_loadable

    model_dir = Path(model_dir)
    check_loadable(model_dir, "model")
    adapter = (model_dir / "adapter_config.json").is_file()
    base_dir = None
    if adapter:
        recorded = json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base_dir = Path(base or recorded or "")
        if not (base_dir / "config.json").is_file():
            problem = f"{model_dir} is a LoRA adapter; its base {str(base_dir)!r} is no checkpoint folder"
            raise InputError(problem, "base")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(model_dir, tokenizer, base_dir))
    if not adapter:
        return FalconH1ForCausalLM.from_pretrained(model_dir).eval(), tok, {"model": str(model_dir)}
    from peft import PeftModel

    base_model = FalconH1ForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    check_adapter_base(model_dir, base_model, base_dir)
    merged = PeftModel.from_pretrained(base_model, model_dir).merge_and_unload().eval()
    return merged, tok, {"adapter": str(model_dir), "base": str(base_dir)}


def check_adapter_base(adapter_dir: Path, base_model, base_dir) -> None:
    """Every LoRA matrix of the adapter fits the module it targets in this base, else an error naming both."""
    from safetensors import safe_open

    modules = dict(base_model.named_modules())
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise InputError(f"{adapter_dir}: adapter_model.safetensors is missing", "model")
    with safe_open(path, "pt") as f:
        for key in f.keys():
            found = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.\w+)?\.weight", key)
            if not found:
                continue
            target, side = found.groups()
            module = modules.get(target)
            if module is None:
                raise InputError(f"{path}: {key} targets {target}, which the base {base_dir} does not have", "base")
            shape = f.get_slice(key).get_shape()
            got, want = (shape[1], module.in_features) if side == "A" else (shape[0], module.out_features)
            if got != want:
                raise InputError(
                    f"{path}: {key} was trained on a base whose {target} has {got} "
                    f"{'inputs' if side == 'A' else 'outputs'}; the base {base_dir} has {want}: not its base",
                    "base",
                )


# ----------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def staging(out: Path, overwrite: bool):
    """A temporary folder beside `out`, renamed to `out` when the block finishes; removed if it raises."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it", "out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old") if out.exists() else None
    if old:
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def stop_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return sorted({i for i in ids if i is not None and i != tokenizer.unk_token_id})


def write_bf16(model, tokenizer, folder: Path) -> None:
    from transformers import GenerationConfig

    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    ).save_pretrained(folder)


def write_nf4(bf16_dir: Path, folder: Path) -> None:
    """transformers quantises the bf16 release with bitsandbytes on load and saves the 4-bit weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GenerationConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise InputError("needs bitsandbytes (pip install -e '.[release]')", "formats: nf4") from e
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["out_proj", "lm_head"],  # align/models.py: the QLoRA recipes' choice
    )
    model = AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(bf16_dir).save_pretrained(folder)
    GenerationConfig.from_pretrained(bf16_dir).save_pretrained(folder)


def write_ggufs(model, tokenizer, folder: Path, formats, name: str, pre_tokenizer=None) -> dict:
    """GGUF files of `formats` → {format: path}. The F16 file is written by us; quantised files are made from it
    (an F16 written only for that is deleted afterwards)."""
    folder.mkdir(exist_ok=True)
    paths = {}
    wanted = [f for f in formats if f.startswith("gguf-")]
    f16 = folder / f"{name}-F16.gguf"
    if any(GGUF_TYPES[f] in ("F16", "Q8_0", "Q4_0", "Q4_K_M") for f in wanted):
        write_gguf(model, tokenizer, f16, "F16", name, pre_tokenizer=pre_tokenizer)
    for fmt in wanted:
        kind = GGUF_TYPES[fmt]
        path = folder / f"{name}-{kind}.gguf"
        if kind == "BF16":
            write_gguf(model, tokenizer, path, "BF16", name, pre_tokenizer=pre_tokenizer)
        elif kind != "F16":
            quantize(f16, path, kind)
        paths[fmt] = path
    if "gguf-f16" not in formats and f16.exists():
        f16.unlink()
    return paths


def file_info(path: Path, root: Path) -> dict:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {"file": str(path.relative_to(root)), "bytes": sum(p.stat().st_size for p in files)}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(model_dir, out, formats=tuple(FORMATS), *, base=None, tokenizer=None, overwrite=False, facts=None,
          heldout_rows=None, pre_tokenizer=None, source_sha256=None) -> dict:  # fmt: skip
    """Writes the release at `out` → its manifest (release.json), with the checks when `heldout_rows` are given."""
    formats = parse_formats(formats)
    out = Path(out)
    if out.exists() and not overwrite:  # before any loading: fail fast
        raise InputError(f"{out} exists; pass --overwrite to replace it", "out")
    model, tok, source = load_source(model_dir, base, tokenizer)
    if source_sha256:
        source["sha256"] = source_sha256
    tok.chat_template = serving_chat_template(tok.chat_template)
    source_model = model.float()
    name = (facts.name if facts else Path(model_dir).resolve().name).replace(" ", "-")
    t0 = time.perf_counter()
    with staging(out, overwrite) as tmp:
        write_bf16(copy.deepcopy(source_model), tok, tmp)  # a copy: saving casts it to bf16
        manifest = {"source": source, "parameters": sum(p.numel() for p in model.parameters()), "formats": {}}
        manifest["formats"]["bf16"] = {"file": "model.safetensors", "bytes": (tmp / "model.safetensors").stat().st_size}
        if "nf4" in formats:
            write_nf4(tmp, tmp / "nf4")
            manifest["formats"]["nf4"] = file_info(tmp / "nf4", tmp)
        try:
            for fmt, path in write_ggufs(source_model, tok, tmp / "gguf", formats, name, pre_tokenizer).items():
                manifest["formats"][fmt] = file_info(path, tmp)
        except GGUFExportError as e:
            raise InputError(str(e), "formats") from e
        manifest["gguf_quantiser"] = "llama.cpp llama_model_quantize (llama-cpp-python)"
        manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
        checks = None
        if heldout_rows:
            from .release_checks import check_release

            t1 = time.perf_counter()
            checks = check_release(tmp, source_model, tok, heldout_rows, manifest)
            checks["seconds"] = round(time.perf_counter() - t1, 1)
            (tmp / "checks.json").write_text(json.dumps(checks, indent=2, ensure_ascii=False))
        write_card(tmp / "README.md", model.config, manifest, facts or CardFacts(name=name), checks)
        (tmp / "release.json").write_text(json.dumps(manifest, indent=2))
    manifest["checks"] = checks
    return manifest


# ----------------------------------------------------------------------------------------------- the offline default
def offline_release(run_dir, final_dir, results: dict, per_language: int, recipes=()) -> dict:
    """`make run`'s last stage: every format of the final model in run_dir/release, checked on the same held-out
    questions as the evaluation → the checks (with "seconds"). A release of the same weights is kept, not redone."""
    from .eval import load_jsonl, subsample

    run_dir, final_dir = Path(run_dir), Path(final_dir)
    out = run_dir / "release"
    weights = sha256(final_dir / "model.safetensors")
    try:
        if json.loads((out / "release.json").read_text())["source"]["sha256"] == weights:
            print(f"[release] {out} holds these weights already, kept", flush=True)
            return json.loads((out / "checks.json").read_text())
    except (OSError, ValueError, KeyError):
        pass
    print(f"[release] {final_dir} → {out}: {', '.join(FORMATS)}, each checked by the program that loads it", flush=True)
    t = time.perf_counter()
    languages = sorted(results[next(iter(results))]["exact_match"]["per_language"])
    facts = CardFacts(
        name=f"falcon-align-offline-{final_dir.name}",
        base_model=f"{run_dir / 'base'} (a tiny Falcon-H1 pretrained by align/offline/base.py)",
        recipes=list(recipes),
        languages=languages,
        intended_use="A worked example of the pipeline end to end: the model answers two kinds of arithmetic "
        f"question (a + b for 0-20, the number after n < 100) in {len(languages)} languages. It is not an assistant.",
        evaluation=evaluation_lines(results),
    )
    rows = subsample(load_jsonl("data/offline/heldout.jsonl"), per_language)
    manifest = build(final_dir, out, FORMATS, overwrite=True, facts=facts, heldout_rows=rows, source_sha256=weights)
    checks = manifest["checks"]
    checks["seconds"] = round(time.perf_counter() - t, 1)
    (out / "checks.json").write_text(json.dumps(checks, indent=2, ensure_ascii=False))
    return checks


def evaluation_lines(results: dict) -> list[str]:
    lines = ["Held-out questions and preference pairs (never trained on):", "",
             "| model | exact match | preference accuracy |", "|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        lines.append(f"| {name} | {r['exact_match']['overall']:.1%} | {r['preference']['accuracy']:.1%} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint or LoRA adapter folder")
    parser.add_argument("--out", required=True, help="release folder (must not exist unless --overwrite)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, from: " + ", ".join(FORMATS))
    parser.add_argument("--base", default=None, help="base checkpoint of a LoRA adapter (default: the recorded one)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's, else the base's)")
    parser.add_argument("--pre-tokenizer", default=None, help="llama.cpp's name for the pre-tokenizer, if not inferred")
    parser.add_argument("--name", default=None, help="model name in the card and GGUF file names")
    parser.add_argument("--check", action="store_true", help="answer --heldout with every format; exit 1 on failure")
    parser.add_argument("--heldout", default="data/offline/heldout.jsonl")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    from .eval import load_jsonl

    rows = load_jsonl(args.heldout) if args.check else None
    facts = CardFacts(name=args.name) if args.name else None
    try:
        manifest = build(args.model, args.out, args.formats, base=args.base, tokenizer=args.tokenizer,
                         overwrite=args.overwrite, facts=facts, heldout_rows=rows,
                         pre_tokenizer=args.pre_tokenizer)  # fmt: skip
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({k: v for k, v in manifest.items() if k != "checks"}, indent=2))
    if manifest["checks"] and manifest["checks"]["problems"]:
        raise SystemExit("release checks failed: " + "; ".join(manifest["checks"]["problems"]))


if __name__ == "__main__":
    main()
