"""SFT with context parallelism through align/sft.py on CPU processes (gloo, DDP) equals the same SFT without it:
2 processes as one context-parallel group vs one process, and 4 processes as 2 data-parallel groups of 2 vs plain
data parallelism on 2 processes — the same losses step by step and the same weights after the run."""

import json
import os
from functools import partial

import torch
import torch.multiprocessing as mp

from align import sft
from align.sft_trainer import FalconSFTTrainer
from align.stage import finish
from model import FalconH1ForCausalLM
from tests.align.test_sft import COMMON, base  # noqa: F401  (the tiny base checkpoint + jsonl mix)
from tests.conftest import free_port, rel_err

STEPS = ["--max_steps", "3", "--learning_rate", "1e-2", "--packing", "True", "--per_device_train_batch_size", "4"]


def _argv(base, out, *extra):  # noqa: F811
    sources = json.dumps([{"path": str(base / "mix.jsonl"), "language_column": "language"}])
    return (
        ["--model_name_or_path", str(base / "base"), "--output_dir", str(out), "--sources", sources]
        + COMMON
        + STEPS
        + list(extra)
    )


def _losses(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


LOGGED = ("entropy", "mean_token_accuracy", "num_tokens")  # the SFT trainer's metrics, gathered over the ranks


def _worker(rank, world, port, argv, result_path):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    seen = []  # each rank's slice length: proof the rows really were split

    def spy(module, args, kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))

    original = FalconH1ForCausalLM.forward
    FalconH1ForCausalLM.forward = lambda self, *a, **kw: (spy(self, a, kw), original(self, *a, **kw))[1]
    sft.FalconSFTTrainer = partial(FalconSFTTrainer, sync_free=True)  # the CUDA step, on these CPU ranks
    trainer = sft.main(argv)
    backbone = trainer.accelerator.unwrap_model(trainer.model).model
    if rank == 0:
        result = {"losses": _losses(trainer), "slices": seen, "cp": backbone.context_parallel is not None}
        result.update({key: _losses(trainer, key) for key in LOGGED})
        if not result["cp"]:
            result["slices"] = []
        result_path.write_text(json.dumps(result))
    finish(trainer)  # as align/sft.py's __main__ does


def _run(argv, world, tmp_path, name):
    path = tmp_path / f"{name}.json"
    mp.start_processes(_worker, args=(world, free_port(), argv, path), nprocs=world, start_method="spawn")
    return json.loads(path.read_text())


def _same_training(result, reference_losses, out, reference_out, forwards, weight_tol=2e-4):
    """weight_tol: fp32, 3 AdamW steps at lr 1e-2 — Adam's normalised update turns last-bit gradient differences
    (another summation order across chunks) into ~1e-4 of the weights; a wrong state, halo or mask moves them by
    orders more (tests/model/test_context_parallel.py bounds the gradients themselves)."""
    assert result["cp"] and len(result["losses"]) == 3
    assert len(result["slices"]) == forwards, result["slices"]  # one forward per step, on half a packed row
    assert all(shape[0] == 1 and 100 <= shape[1] <= 260 for shape in result["slices"]), result["slices"]
    for a, b in zip(result["losses"], reference_losses):
        assert abs(a - b) <= 1e-4 * abs(b), (result["losses"], reference_losses)
    ours = FalconH1ForCausalLM.from_pretrained(out).state_dict()
    reference = FalconH1ForCausalLM.from_pretrained(reference_out).state_dict()
    for name, tensor in reference.items():
        assert rel_err(ours[name], tensor) < weight_tol, name


def test_context_parallel_sft_equals_one_process(base, tmp_path):  # noqa: F811
    single = sft.main(_argv(base, tmp_path / "single"))
    cp = _run(_argv(base, tmp_path / "cp", "--context_parallel_size", "2"), 2, tmp_path, "cp")
    _same_training(cp, _losses(single), tmp_path / "cp", tmp_path / "single", forwards=3)


def test_data_parallel_groups_of_context_parallel_ranks(base, tmp_path):  # noqa: F811
    ddp = _run(_argv(base, tmp_path / "ddp"), 2, tmp_path, "ddp")
    both = _run(_argv(base, tmp_path / "both", "--context_parallel_size", "2"), 4, tmp_path, "both")
    assert not ddp["cp"]
    # gradients all-reduced over 4 ranks instead of 2 (another summation order), then 3 AdamW steps at lr 1e-2,
    # which normalise tiny gradients up: weights agree to ~2e-4
    _same_training(both, ddp["losses"], tmp_path / "both", tmp_path / "ddp", forwards=3, weight_tol=1e-3)


def test_data_parallel_equals_one_process(base, tmp_path):  # noqa: F811
    """Plain DDP through align/sft.py (the stage's default path: on CPU eager layers, no graphs; under
    torch.distributed never graphs or a second stream), the ranks on the CUDA step (sync_free), the one process on
    TRL's: 2 processes × 2 rows per step train as one process × 4 rows — the same losses, entropy, top-1 accuracy and
    token counts step by step and the same weights (fp32; Adam's normalised steps turn the all-reduce's other
    summation order into ~1e-4 of the weights)."""
    single = sft.main(_argv(base, tmp_path / "single"))
    ddp = _run(_argv(base, tmp_path / "ddp", "--per_device_train_batch_size", "2"), 2, tmp_path, "ddp")
    assert not ddp["cp"] and len(ddp["losses"]) == 3
    for a, b in zip(ddp["losses"], _losses(single)):
        assert abs(a - b) <= 1e-4 * abs(b), (ddp["losses"], _losses(single))
    for key in LOGGED:  # sums of both ranks' tokens, as the one process counts them
        got, want = ddp[key], _losses(single, key)
        assert len(got) == 3 and all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got, want)), (key, got, want)
    assert ddp["num_tokens"] == _losses(single, "num_tokens")
    ours = FalconH1ForCausalLM.from_pretrained(tmp_path / "ddp").state_dict()
    reference = FalconH1ForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    before = FalconH1ForCausalLM.from_pretrained(base / "base").state_dict()
    assert any(rel_err(t, before[n]) > 1e-3 for n, t in reference.items())  # training moved the weights
    for name, tensor in reference.items():
        assert rel_err(ours[name], tensor) < 1e-3, name
