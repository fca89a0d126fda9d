"""`make run` until the SFT pipeline lands: a real, offline, end-to-end use of the model on CPU.

1. builds a tiny byte-level Falcon-H1 from scratch (all µP multipliers of the 0.5B release),
2. trains it on packed rows of generated documents (alphabet / digit runs), documents isolated by
   restarting position_ids, with the chunked logit-multiplier-aware loss,
3. saves a safetensors checkpoint, reloads it strictly into ours *and* into vanilla transformers and checks
   that the logits agree,
4. greedy-decodes with the hybrid cache and checks it against cache-free decoding,
5. prints a table (held-out next-character accuracy before/after training, timings).

    python -m model.showcase --out runs/tiny-model [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from model import FalconH1Config, FalconH1ForCausalLM
from model.presets import _MUP_0_5B

ALPHABETS = ["abcdefghijklmnopqrstuvwxyz", "0123456789", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
OFFSET = 3  # byte b ↦ id b+3; 0 pad, 1 bos, 2 eos


def encode(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode()]


def decode(ids) -> str:
    return bytes(max(i - OFFSET, 0) for i in ids if i >= OFFSET).decode(errors="replace")


def make_document(rng: random.Random) -> str:
    alphabet = rng.choice(ALPHABETS)
    start, length = rng.randrange(len(alphabet)), rng.randint(6, 30)
    return "".join(alphabet[(start + i) % len(alphabet)] for i in range(length))


def packed_row(rng: random.Random, width: int):
    """Documents back to back until `width`; position_ids restart at 0 for each one."""
    ids, pos = [], []
    while len(ids) < width:
        doc = [1] + encode(make_document(rng))
        ids += doc
        pos += list(range(len(doc)))
    return ids[:width], pos[:width]


def tiny_config() -> FalconH1Config:
    return FalconH1Config(
        vocab_size=260,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        mamba_d_ssm=128,
        mamba_n_heads=8,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_chunk_size=32,
        mamba_rms_norm=True,
        mamba_norm_before_gate=False,
        rope_theta=1e11,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **_MUP_0_5B,
    )


@torch.no_grad()
def next_char_accuracy(model, docs: list[str]) -> float:
    correct = total = 0
    for doc in docs:
        ids = torch.tensor([[1] + encode(doc)])
        pred = model(ids, use_cache=False).logits[0, 1:-1].argmax(-1)  # predictions after the first character
        correct += int((pred == ids[0, 2:]).sum())
        total += ids.shape[1] - 2
    return correct / total


def train(model, steps: int, rng: random.Random, batch=8, width=128, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        rows = [packed_row(rng, width) for _ in range(batch)]
        ids = torch.tensor([r[0] for r in rows])
        pos = torch.tensor([r[1] for r in rows])
        labels = ids.masked_fill(pos == 0, -100)  # never predict a document start from the previous one
        loss = model(ids, position_ids=pos, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}", flush=True)
    model.eval()
    return losses


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/tiny-model")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = random.Random(args.seed)
    held_out = [make_document(random.Random(10_000 + i)) for i in range(64)]
    out = Path(args.out)

    model = FalconH1ForCausalLM(tiny_config())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[1/4] tiny Falcon-H1, {n_params / 1e6:.2f}M parameters, 0.5B µP multipliers")
    acc_before = next_char_accuracy(model.eval(), held_out)

    print(f"[2/4] training {args.steps} steps on packed rows (documents isolated by position_ids)")
    t0 = time.perf_counter()
    losses = train(model, args.steps, rng)
    train_s = time.perf_counter() - t0
    acc_after = next_char_accuracy(model, held_out)

    print(f"[3/4] save → {out} (safetensors), reload strictly into ours and into vanilla transformers")
    model.save_pretrained(out)
    probe = torch.tensor([[1] + encode("klmnopq")])
    reloaded = FalconH1ForCausalLM.from_pretrained(out).eval()
    from transformers import AutoModelForCausalLM

    vanilla = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ref = model(probe).logits
        err_ours = (reloaded(probe).logits - ref).abs().max().item()
        err_vanilla = (vanilla(probe).logits - ref).abs().max().item()

    print("[4/4] greedy decoding with the hybrid cache")
    prompts = ["klm", "345", "WXY"]
    samples, cache_matches = {}, True
    for text in prompts:
        ids = torch.tensor([[1] + encode(text)])
        cached = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
        cache_matches &= cached.tolist() == uncached.tolist()
        samples[text] = decode(cached[0, ids.shape[1] :].tolist())

    report = {
        "params": n_params,
        "steps": args.steps,
        "train_seconds": round(train_s, 1),
        "first_loss": round(losses[0], 3),
        "last_loss": round(losses[-1], 3),
        "heldout_next_char_accuracy_before": round(acc_before, 3),
        "heldout_next_char_accuracy_after": round(acc_after, 3),
        "reload_max_abs_logit_diff_ours": err_ours,
        "reload_max_abs_logit_diff_vanilla_transformers": err_vanilla,
        "cached_equals_uncached_decoding": cache_matches,
        "samples": samples,
        "checkpoint": str(out),
    }
    (out / "showcase_report.json").write_text(json.dumps(report, indent=2))
    print("\n| check | value |\n|---|---|")
    print(f"| loss (first → last step) | {losses[0]:.3f} → {losses[-1]:.3f} |")
    print(f"| held-out next-char accuracy (before → after) | {acc_before:.1%} → {acc_after:.1%} |")
    print(f"| reload: max |Δlogit| ours / vanilla transformers | {err_ours:.1e} / {err_vanilla:.1e} |")
    print(f"| cached decoding == uncached | {cache_matches} |")
    for text, cont in samples.items():
        print(f"| greedy '{text}' → | '{cont}' |")
    ok = acc_after > acc_before + 0.3 and err_ours < 1e-5 and err_vanilla < 1e-4 and cache_matches
    print(f"\n{'OK' if ok else 'FAILED'}: report in {out / 'showcase_report.json'}")
    if not ok:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
