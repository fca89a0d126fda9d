"""`python -m bench grpo` on CPU in fp32, one layer of the 0.5B shape: both sides run, the result carries the schema of
bench/results/README.md, and each side's generate agrees with its own training forward."""

import json

from bench import grpo


def test_grpo_bench_smoke_on_cpu(tmp_path, capsys):
    out = tmp_path / "grpo.json"
    argv = ["--preset", "0.5b", "--layers", "1", "--device", "cpu", "--dtype", "float32", "--prompts", "2"]
    argv += ["--generations", "2", "--prompt-words", "6", "--completion", "3", "--steps", "1", "--warmup", "1"]
    grpo.main([*argv, "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["card"] == "cpu" and record["command"].startswith("python -m bench grpo --preset 0.5b")
    for side in ("ours", "reference"):
        r = record[side]
        assert r["completion_tokens"] == 2 * 2 * 3 and r["tokens"] > r["completion_tokens"], side
        assert r["generation_tokens_per_s"] > 0 and r["training_tokens_per_s"] > 0 and r["step_s"] > 0
        assert r["logprob_agreement"]["abs_diff_max"] <= 1e-4, (side, r["logprob_agreement"])  # fp32
    assert record["ours"]["logged_abs_diff_max"] <= 1e-5
    assert record["speedup_generation"] > 0 and "|Δ logp| max" in capsys.readouterr().out
