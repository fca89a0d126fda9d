"""Context parallelism on CPU (gloo, 2 and 3 processes): forward and backward equal one process exactly —
logits, loss and every gradient — with packed documents crossing rank boundaries, a document starting exactly at
a boundary, a short document inside the conv halo, and one document spanning all ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import model.context_parallel as context_parallel
import model.mixers as mixers
from model.context_parallel import disable_context_parallel, enable_context_parallel, local_index, shard
from tests.conftest import free_port, rel_err, tiny_model

CASES = {  # world size → document lengths of one packed row (length divisible by the world size)
    2: [[10, 20, 18], [24, 24], [48], [22, 3, 23]],
    3: [[5, 40, 3], [16, 1, 15, 16]],
}


def _row(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (1, sum(lengths)), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, pos


def _loss_sum(model, **inputs):
    return model(**inputs, num_items_in_batch=1, return_logits=True)  # summed CE: ranks add up


def _worker(rank, world, port, cases, errors, backend="gloo"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    tol = 1e-5 if device.type == "cpu" else 5e-3  # fp32 on GPU: Triton scans run their dots in tf32
    try:
        torch.use_deterministic_algorithms(device.type == "cpu")
        for i, lengths in enumerate(cases):
            # the first case also scans in segments of 5 tokens (long rows do, inside each chunk too)
            mixers.SCAN_SEGMENT_TOKENS = 5 if i == 0 else 1 << 30
            # even cases: attention one query head at a time (long documents do); odd: keys repeated to the heads
            context_parallel.GQA_REPEAT_MAX_KEYS = 0 if i % 2 == 0 else 1 << 30
            model = tiny_model(seed=21, mamba_chunk_size=8, mamba_n_groups=2).to(device)
            ids, pos = (t.to(device) for t in _row(lengths, seed=i))
            # one process, whole row: the reference
            shifted = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
            doc_end = torch.nn.functional.pad(pos[:, 1:] != pos[:, :-1] + 1, (0, 1), value=True)
            shifted = shifted.masked_fill(doc_end, -100)
            ref = _loss_sum(model, input_ids=ids, position_ids=pos, shift_labels=shifted)
            ref.loss.backward()
            ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
            # the same row split over the ranks
            enable_context_parallel(model)
            local = shard(ids, pos, ids)
            out = _loss_sum(model, **local)
            out.loss.backward()
            disable_context_parallel(model)
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)
            for p in model.parameters():
                dist.all_reduce(p.grad)
            mine = local_index(ids.size(1), world, rank, device)  # this rank's two chunks of the row
            assert rel_err(out.logits, ref.logits[:, mine]) < tol, ("logits", lengths)
            assert abs(loss - ref.loss) <= tol * abs(ref.loss), ("loss", lengths, float(loss), float(ref.loss))
            for name, p in model.named_parameters():
                err = rel_err(p.grad, ref_grads[name])
                assert err < 10 * tol, ("grad", name, lengths, err)
    except BaseException as err:  # report to the parent, keep the other ranks from hanging in a collective
        errors.put(f"rank {rank}: {err!r}")
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(CASES))
def test_context_parallel_equals_one_process(world):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, free_port(), CASES[world], errors), nprocs=world, start_method="spawn")
    assert errors.empty()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_context_parallel_on_two_gpus():
    """The same cases through NCCL and the CUDA kernels (Triton scan with initial states, flash attention)."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    args = (2, free_port(), CASES[2], errors, "nccl")
    mp.start_processes(_worker, args=args, nprocs=2, start_method="spawn")
    assert errors.empty()


def test_context_parallel_leaks_without_state_passing():
    """Control: the exactness above is the state passing and the halo — dropping both changes the logits."""
    model = tiny_model(seed=21, mamba_chunk_size=8)
    ids, pos = _row([48], seed=0)
    with torch.no_grad():
        whole = model(ids, position_ids=pos).logits
        second_alone = model(ids[:, 24:], position_ids=pos[:, 24:] - 24).logits  # rank 1 without rank 0's state
    assert rel_err(second_alone, whole[:, 24:]) > 1e-2


def test_long_context_bench_runs_on_cpu(tmp_path):
    """`python -m bench long`'s own smoke mode: one process with offload, two context-parallel processes with LoRA."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = ["-m", "bench", "long", "--tiny"]
    one = [sys.executable, *script, "--seqs", "64,128", "--offload", "--out", str(tmp_path / "a.json")]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    two += [*script, "--seqs", "64", "--method", "lora", "--out", str(tmp_path / "b.json")]
    for command in (one, two):
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    for name, longest, processes in (("a", 128, 1), ("b", 64, 2)):
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["longest"] == longest and record["processes"] == processes
        assert record["command"].startswith("torchrun --nproc_per_node 2 -m bench long" if processes > 1 else "python")


def test_enable_context_parallel_reaches_the_backbone_through_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(seed=1), LoraConfig(r=2, target_modules=["q_proj"]))
    cp = enable_context_parallel(model)
    assert model.get_base_model().model.context_parallel is cp
    disable_context_parallel(model)
    assert model.get_base_model().model.context_parallel is None
    with pytest.raises(ValueError, match="Falcon-H1"):
        enable_context_parallel(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "device, dtype, tol",
    [
        ("cpu", torch.float64, 1e-10),
        pytest.param("cuda", torch.bfloat16, 2e-2, marks=[pytest.mark.gpu, pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs CUDA")]),
    ],
)  # fmt: skip
@pytest.mark.parametrize("lq, lk, repeat_max", [(6, 6, 0), (6, 20, 1 << 30), (6, 20, 0), (32, 80, 0)])
def test_attend_segment_equals_gqa_attention(monkeypatch, device, dtype, tol, lq, lk, repeat_max):
    """Each way a context-parallel document piece attends (plain causal with enable_gqa, keys repeated, one call per
    query head) equals SDPA with enable_gqa and an explicit lower-right causal mask, forward and gradients; on a
    GPU in bf16, where the flash/efficient kernels take the lower-right bias."""
    from model import context_parallel

    monkeypatch.setattr(context_parallel, "GQA_REPEAT_MAX_KEYS", repeat_max)
    gen = torch.Generator().manual_seed(lk)
    q, k, v = (torch.randn(1, h, n, 64, generator=gen, dtype=torch.float64) for h, n in ((6, lq), (2, lk), (2, lk)))
    q, k, v = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
    mask = context_parallel.causal_lower_right(lq, lk) if lq != lk else None
    out = context_parallel._attend_segment(q, k, v, mask, 0.125, group=3)
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)  # query i sees keys ≤ i + lk − lq
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.125, enable_gqa=True)
    probe = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    grads = torch.autograd.grad((out * probe).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * probe).sum(), (q, k, v))
    assert rel_err(out, ref) < tol
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < tol
