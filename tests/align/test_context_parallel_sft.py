"""SFT with context parallelism through align/sft.py on 2 CPU processes (gloo, DDP) equals the same SFT in one
process: the same losses step by step and the same weights after the run."""

import json
import os
import socket

import torch
import torch.multiprocessing as mp

from align import sft
from model import FalconH1ForCausalLM
from tests.align.test_sft import COMMON, base  # noqa: F401  (the tiny base checkpoint + jsonl mix)
from tests.conftest import rel_err

STEPS = ["--max_steps", "3", "--learning_rate", "1e-2", "--packing", "True", "--per_device_train_batch_size", "4"]


def _argv(base, out, *extra):  # noqa: F811
    sources = json.dumps([{"path": str(base / "mix.jsonl"), "language_column": "language"}])
    return (
        ["--model_name_or_path", str(base / "base"), "--output_dir", str(out), "--sources", sources]
        + COMMON
        + STEPS
        + list(extra)
    )


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


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
    trainer = sft.main(argv)
    backbone = trainer.accelerator.unwrap_model(trainer.model).model
    if rank == 0:
        result = {"losses": _losses(trainer), "slices": seen, "cp": backbone.context_parallel is not None}
        result_path.write_text(json.dumps(result))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_context_parallel_sft_equals_one_process(base, tmp_path):  # noqa: F811
    single = sft.main(_argv(base, tmp_path / "single"))
    argv = _argv(base, tmp_path / "cp", "--context_parallel_size", "2")
    mp.start_processes(
        _worker, args=(2, _free_port(), argv, tmp_path / "cp_losses.json"), nprocs=2, start_method="spawn"
    )
    result = json.loads((tmp_path / "cp_losses.json").read_text())
    cp_losses = result["losses"]
    assert result["cp"] and len(cp_losses) == 3
    assert len(result["slices"]) == 3, result["slices"]  # one forward per step, on half a packed row each
    assert all(shape[0] == 1 and 100 <= shape[1] <= 260 for shape in result["slices"]), result["slices"]
    for a, b in zip(cp_losses, _losses(single)):
        assert abs(a - b) <= 1e-4 * abs(b), (cp_losses, _losses(single))
    ours = FalconH1ForCausalLM.from_pretrained(tmp_path / "cp").state_dict()
    reference = FalconH1ForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    for name, tensor in reference.items():
        assert rel_err(ours[name], tensor) < 1e-4, name
