"""DPO under DDP on CPU processes (gloo) through align/dpo.py, the ranks on the sync-free step (the CUDA default),
equals one process on TRL's step: the metrics each rank gathers before its log are the whole batch's."""

import json
import os
from functools import partial

import torch
import torch.multiprocessing as mp

from align import dpo
from align.preference import FalconDPOTrainer
from align.stage import finish
from model import FalconH1ForCausalLM
from tests.align.test_dpo import base, run_dpo  # noqa: F401  (base: the module's tiny checkpoint and pairs)
from tests.conftest import free_port, rel_err

STEPS = ("--max_steps", "3", "--learning_rate", "3e-3", "--padding_free", "True", "--precompute_ref_log_probs", "True")
LOGGED = ("loss", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen")
LOGGED += ("rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "num_tokens")


def _logged(history, key):
    return [h[key] for h in history if key in h and "train_runtime" not in h]


def _worker(rank, world, port, base, out, result_path):  # noqa: F811
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dpo.FalconDPOTrainer = partial(FalconDPOTrainer, sync_free=True)  # the CUDA step, on these CPU ranks
    trainer = run_dpo(base, out, *STEPS, "--per_device_train_batch_size", "4")
    if rank == 0:
        assert trainer.own_step and trainer.accelerator.num_processes == world
        result_path.write_text(json.dumps(trainer.state.log_history))
    finish(trainer)  # as align/dpo.py's __main__ does


def test_sync_free_dpo_on_two_ranks_equals_trls_step_in_one_process(base, tmp_path):  # noqa: F811
    """2 processes × 4 pairs a step against 1 × 8, fp32, 3 steps: the same loss and DPO metrics at each log (each
    rank's sums gathered before the ratios, as TRL's step gathers them) and the same weights after."""
    single = run_dpo(base, tmp_path / "single", *STEPS, "--per_device_train_batch_size", "8")
    assert not single.own_step
    path = tmp_path / "ddp.json"
    mp.start_processes(_worker, args=(2, free_port(), base, tmp_path / "ddp", path), nprocs=2, start_method="spawn")
    ddp, history = json.loads(path.read_text()), single.state.log_history
    for key in LOGGED:
        got, want = _logged(ddp, key), _logged(history, key)
        assert len(got) == len(want) == 3, key
        assert all(abs(a - b) <= 1e-4 * max(abs(b), 1e-2) for a, b in zip(got, want)), (key, got, want)
    assert _logged(ddp, "num_tokens") == _logged(history, "num_tokens")
    ours = FalconH1ForCausalLM.from_pretrained(tmp_path / "ddp").state_dict()
    for name, tensor in single.model.state_dict().items():
        assert rel_err(ours[name], tensor) < 1e-3, name
