"""The path a training stage runs on, decided once before the Trainer is built and logged in one line.

On CUDA the fastest path that fits is the default, for full fine-tuning and LoRA alike:
- compiled layers (`compile_layers`; None: on CUDA);
- CUDA graphs over every layer's forward and backward for padding-free packed rows (`training_graphs`; None: on CUDA,
  one process, padding-free rows). Rows are captured as one row of `graph_tokens` tokens (default: what one
  micro-batch can hold) with `graph_doc_slots` documents of at most max_length tokens each; a shorter row gets
  trailing filler documents that change no loss or gradient (model/graphs.py). The varlen attention kernel launches
  work for every slot, so the slots are what the micro-batches need: DPO's chosen and rejected sequences, one document
  a row without packing, and with packing the most documents a packed row of the training set holds
  (`fit_doc_slots`, once the Trainer has packed it). DPO's budget is what its longest pairs hold, and three smaller
  budgets are captured beside it where micro-batches of its pairs land (`fit_pair_tokens`, `graph_budgets`): each
  micro-batch replays the smallest that holds it. A micro-batch that does not fit runs eagerly and is counted: the
  logs carry `graphs_replayed`, `graphs_eager` and `graphs_fill` every logging step;
- activation checkpointing only where the run would not fit without it (`gradient_checkpointing: auto`, the default:
  model.memory's planner at the micro-batch's tokens, against the card's memory);
- batches copied to the GPU asynchronously from pinned memory (`accelerator_config.non_blocking`), so the host does not
  wait for the GPU between micro-batches.
Under torch.distributed the layers compile, and graphs and the mixers' second stream stay off: FSDP gathers weights
inside each forward, and DDP's gradient hooks are not validated with captured backwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from model import FalconH1ForCausalLM
from model.graphs import enable_training_graphs
from model.memory import plan

logger = logging.getLogger("falcon_align")


@dataclass
class TrainingPath:
    compile_layers: bool
    graphs: bool
    checkpointing: bool
    graph_tokens: int | None = None
    graph_doc_slots: int | None = None
    graph_doc_len: int | None = None  # the longest document a captured row takes (max_length)
    slots_from_data: bool = False  # graph_doc_slots is a placeholder until fit_doc_slots has read the packed rows
    tokens_from_data: bool = False  # graph_tokens is the worst case until fit_pair_tokens has read the pairs
    budget_count: int = 1  # token budgets to capture (DPO: the smaller ones from the pairs' micro-batch lengths)
    graph_budgets: list[int] = field(default_factory=list)  # the smaller budgets captured beside graph_tokens
    headroom_gib: float | None = None  # the card's memory the planner leaves free at graph_tokens, where it planned
    reasons: list[str] = field(default_factory=list)

    @property
    def fillers(self) -> int:
        """The most filler documents a short micro-batch takes: each at most graph_doc_len tokens."""
        return -(-self.graph_tokens // self.graph_doc_len)

    def describe(self) -> str:
        parts = [
            "compiled layers" if self.compile_layers else "eager layers",
            f"CUDA graphs ({'/'.join(map(str, [*self.graph_budgets, self.graph_tokens]))} tokens, "
            + (
                "document slots from the packed rows"
                if self.slots_from_data
                else f"{self.graph_doc_slots} document slots"
            )
            + f" of up to {self.graph_doc_len} tokens)"
            if self.graphs
            else "no CUDA graphs",
            "activation checkpointing" if self.checkpointing else "no activation checkpointing",
        ]
        return ", ".join(parts) + (f" — {'; '.join(self.reasons)}" if self.reasons else "")


def falcon_model(model) -> FalconH1ForCausalLM | None:
    """Our FalconH1ForCausalLM inside `model` (a PEFT wrapper, say), or None."""
    return next((m for m in model.modules() if isinstance(m, FalconH1ForCausalLM)), None)


def row_tokens(train_args, pairs: bool) -> int | None:
    """The most tokens one padding-free micro-batch holds: per_device_train_batch_size × max_length (× 2 for DPO's
    chosen and rejected sequences)."""
    if not getattr(train_args, "max_length", None):  # GRPO's rows have no max_length
        return None
    return train_args.per_device_train_batch_size * train_args.max_length * (2 if pairs else 1)


def decide(model, align_args, train_args, padding_free: bool, pairs: bool = False) -> TrainingPath:
    """The path for this run: each choice from the recipe, or by default from the device and the planner."""
    ours = falcon_model(model)
    cuda = next(model.parameters()).device.type == "cuda" or torch.cuda.is_available()
    distributed = train_args.world_size > 1
    reasons = []
    if ours is None and (align_args.compile_layers or align_args.training_graphs):
        raise ValueError("compile_layers and training_graphs need falcon-align's Falcon-H1 (model_type falcon_h1)")
    quantized = bool(getattr(model, "is_quantized", False) or getattr(ours, "is_quantized", False))
    if quantized and cuda:  # bitsandbytes' 4/8-bit layers are not captured or compiled by default
        reasons.append("compile and graphs off: quantized weights")
    fast = cuda and ours is not None and not quantized
    compile_layers = align_args.compile_layers if align_args.compile_layers is not None else fast
    tokens = align_args.graph_tokens or row_tokens(train_args, pairs)
    graphs = align_args.training_graphs
    if graphs is None:
        graphs = fast and padding_free and tokens is not None and not distributed
        if fast and not graphs:
            why = "several processes" if distributed else "rows are not padding-free" if not padding_free else ""
            reasons.append(f"graphs off: {why or 'no max_length'}")
    if graphs and (not padding_free or tokens is None):
        raise ValueError("training_graphs needs padding-free rows (packing or padding_free) and max_length")
    checkpointing, headroom = _checkpointing(ours, align_args, train_args, tokens, reasons)
    if graphs and checkpointing:
        if align_args.training_graphs:
            raise ValueError("training_graphs and activation checkpointing do not combine; set one of them off")
        graphs = False
        reasons.append("graphs off: activation checkpointing is needed")
    if not graphs:
        return TrainingPath(compile_layers, graphs, checkpointing, reasons=reasons)
    doc_len = min(getattr(train_args, "max_length", None) or tokens, tokens)
    path = TrainingPath(
        compile_layers, graphs, checkpointing, tokens, align_args.graph_doc_slots, doc_len, reasons=reasons
    )
    if not path.graph_doc_slots:
        path.graph_doc_slots, path.slots_from_data = default_doc_slots(path, train_args, pairs)
    path.tokens_from_data = pairs and not align_args.graph_tokens and not align_args.graph_doc_slots
    path.headroom_gib = headroom
    if (align_args.graph_budgets or 1) > 1 and not pairs:
        raise ValueError("graph_budgets: several token budgets are captured for DPO's pairs only")
    path.budget_count = align_args.graph_budgets or (DPO_BUDGETS if pairs else 1)
    return path


def default_doc_slots(path: TrainingPath, train_args, pairs: bool) -> tuple[int, bool]:
    """→ (document slots a captured micro-batch holds, whether packed data decides them later). Every slot costs
    the varlen attention kernel a launch over `graph_doc_len` tokens, used or not."""
    batch = train_args.per_device_train_batch_size
    if pairs:  # DPO: each pair's chosen and rejected sequences
        return 2 * batch + path.fillers, False
    if not getattr(train_args, "packing", False):  # padding_free rows: one document each
        return batch + path.fillers, False
    return max(64, path.graph_tokens // 128), True  # until fit_doc_slots reads the packed rows


def fit_doc_slots(path: TrainingPath, dataset, train_args) -> None:
    """Packed SFT rows: the slots from the most documents a packed row of `dataset` holds (TRL's `seq_lengths`,
    read from Arrow without loading the rows) × the rows of a micro-batch, plus the fillers. Kept as they are where
    the recipe set `graph_doc_slots` or the dataset has no such column (a streamed dataset, say)."""
    if not (path.graphs and path.slots_from_data):
        return
    path.slots_from_data = False
    table = getattr(dataset, "data", None)
    if table is None or "seq_lengths" not in (getattr(dataset, "column_names", None) or ()):
        logger.info(
            "training graphs: %d document slots (the packed rows' documents are not countable)", path.graph_doc_slots
        )
        return
    import pyarrow.compute as pc

    most = pc.max(pc.list_value_length(table.column("seq_lengths"))).as_py() or 1
    path.graph_doc_slots = most * train_args.per_device_train_batch_size + path.fillers
    logger.info(
        "training graphs: %d document slots (packed rows hold up to %d documents; %d for fillers)",
        path.graph_doc_slots,
        most,
        path.fillers,
    )


DPO_BUDGETS = 4  # token budgets captured for DPO by default: their mean filler is a few % of a micro-batch


def fit_pair_tokens(path: TrainingPath, dataset, train_args, multiple: int = 256, model=None) -> None:
    """DPO: the captured token budgets from the pairs themselves, not per_device_train_batch_size × 2 × max_length.
    A micro-batch holds at most the `batch` longest pairs of `dataset` (prompt + chosen and prompt + rejected, each
    cut at max_length), rounded up to `multiple`: the largest budget, with the slots it needs (2 a pair, plus the
    fillers); kept as decided where the recipe set `graph_tokens` or `graph_doc_slots`. Every captured token is
    computed, so pairs far shorter than that would spend much of the step on filler: `budget_count - 1` smaller
    budgets are captured too, where micro-batches of random pairs land (`pair_budgets`), as many as the planner's
    headroom holds (`model`: ours, for their sizes). Nothing changes where the pairs' columns are not there."""
    names = getattr(dataset, "column_names", None) or ()
    table = getattr(dataset, "data", None)
    fit = path.tokens_from_data
    path.tokens_from_data = False
    if not path.graphs or table is None or not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(names):
        return
    import numpy as np
    import pyarrow.compute as pc

    def length(name):
        return pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)

    cut = path.graph_doc_len
    prompt = length("prompt_ids")
    pairs = np.minimum(prompt + length("chosen_ids"), cut) + np.minimum(prompt + length("rejected_ids"), cut)
    batch = train_args.per_device_train_batch_size
    most = int(np.sort(pairs)[-batch:].sum()) if len(pairs) else path.graph_tokens
    if fit and most < path.graph_tokens:
        path.graph_tokens = min(path.graph_tokens, -(-most // multiple) * multiple)
        path.graph_doc_slots = 2 * batch + path.fillers
    path.graph_budgets = _affordable(
        pair_budgets(pairs, batch, path.budget_count, path.graph_tokens, multiple), path, model
    )
    logger.info(
        "training graphs: %s tokens, %d document slots (the %d longest pairs hold %d tokens)",
        "/".join(map(str, [*path.graph_budgets, path.graph_tokens])),
        path.graph_doc_slots,
        batch,
        most,
    )


def micro_batch_sizes(pairs, batch: int, top: int, multiple: int, draws: int = 4096) -> tuple[list[int], list[int]]:
    """Micro-batches of `batch` pairs drawn at random from `pairs` (each pair's tokens), as the Trainer's shuffled
    sampler draws them, their tokens rounded up to `multiple` and capped at `top` → (distinct sizes, ascending; how
    many draws took each)."""
    import numpy as np

    drawn = np.asarray(pairs)[np.random.default_rng(0).integers(0, len(pairs), (draws, batch))].sum(1)
    sizes, counts = np.unique(np.minimum(-(-drawn // multiple) * multiple, top), return_counts=True)
    return sizes.tolist(), counts.tolist()


def pair_budgets(pairs, batch: int, count: int, top: int, multiple: int) -> list[int]:
    """The `count - 1` token budgets below `top` that minimise the mean budget a micro-batch replays (the smallest
    that holds it) over `micro_batch_sizes`: exact, by dynamic programming over the distinct sizes. Ascending; fewer
    where fewer save anything."""
    if count <= 1 or len(pairs) == 0:
        return []
    sizes, counts = micro_batch_sizes(pairs, batch, top, multiple)
    if sizes[-1] == top:  # those draws replay the top budget whatever the rungs below it
        sizes, counts = sizes[:-1], counts[:-1]
    n = len(sizes)
    above = [sum(counts[i:]) for i in range(n + 1)]  # draws of size index ≥ i
    # best[r][i]: least total budget over the draws of sizes[:i] with r rungs, the highest at sizes[i - 1]
    inf = float("inf")
    best = [[0.0] + [inf] * n] + [[inf] * (n + 1) for _ in range(count - 1)]
    back = [[0] * (n + 1) for _ in range(count)]
    for r in range(1, count):
        for i in range(1, n + 1):
            for j in range(i):  # the rung below at sizes[j - 1] (j = 0: none): sizes[j:i] replay sizes[i - 1]
                cost = best[r - 1][j] + sizes[i - 1] * (above[j] - above[i])
                if cost < best[r][i]:
                    best[r][i], back[r][i] = cost, j
    # the draws above the highest rung replay the top budget
    total = {(r, i): best[r][i] + top * above[i] for r in range(count) for i in range(n + 1) if best[r][i] < inf}
    r, i = min(total, key=lambda ri: (total[ri], ri[0]))
    chosen = []
    while r > 0:
        chosen.append(sizes[i - 1])
        r, i = r - 1, back[r][i]
    return sorted(chosen)


def _affordable(budgets: list[int], path: TrainingPath, model) -> list[int]:
    """The smaller budgets whose own memory fits the planner's headroom, the smallest dropped first (it saves the
    least): each rung keeps its own copy of the trainable parameters' gradients and every layer's input and output at
    its budget. All of them where nothing was planned (`model`: ours, for the sizes)."""
    ours = falcon_model(model) if model is not None else None
    if ours is None or path.headroom_gib is None:
        return budgets
    cfg = ours.config
    grads = sum(p.numel() * p.element_size() for p in ours.model.layers.parameters() if p.requires_grad)
    width = next(ours.parameters()).element_size()
    gib = [(grads + 2 * cfg.num_hidden_layers * b * cfg.hidden_size * width) / 2**30 for b in budgets]
    while budgets and sum(gib) >= path.headroom_gib:
        budgets, gib = budgets[1:], gib[1:]
    return budgets


def _checkpointing(ours, align_args, train_args, tokens, reasons) -> tuple[bool, float | None]:
    """`gradient_checkpointing: auto`: on where the planner puts the run without it over the card's memory. → (on,
    the GiB it leaves free of 90% of the card, where it planned)."""
    if not getattr(align_args, "auto_checkpointing", False):
        return bool(train_args.gradient_checkpointing), None
    if not torch.cuda.is_available() or ours is None or tokens is None:
        reasons.append("checkpointing off: auto, " + ("nothing to plan" if torch.cuda.is_available() else "on CPU"))
        return False, None
    card = torch.cuda.get_device_properties(0).total_memory / 2**30
    method = "lora" if any("lora_" in n for n, _ in ours.named_parameters()) else "full"
    need = plan(ours.config, method=method, card_gib=card, seq=tokens, checkpointing=False).peak_gib_at_seq
    on = need > card * 0.9
    reasons.append(f"checkpointing {'on' if on else 'off'}: auto, {need:.1f} GiB planned without it of {card:.0f} GiB")
    return on, card * 0.9 - need


def apply(path: TrainingPath, model, train_args) -> list[TrainerCallback]:
    """Compiles the layers and sets the checkpointing decision on the Trainer's arguments (before the Trainer is
    built); → the callbacks the Trainer takes (graph capture at the start of training, counts in the logs)."""
    logger.info("training path: %s", path.describe())
    train_args.gradient_checkpointing = path.checkpointing
    if torch.cuda.is_available() and train_args.dataloader_pin_memory:
        # batches reach the GPU by asynchronous copies from pinned memory: a blocking copy waits for the GPU
        train_args.accelerator_config.non_blocking = True
    ours = falcon_model(model)
    if path.compile_layers and ours is not None:
        ours.compile_layers()
    return [TrainingGraphsCallback(path)] if path.graphs else []


class TrainingGraphsCallback(TrainerCallback):
    """Captures the layers once the model sits on its device (the Trainer's start), and adds the graphs' counts to
    every log: `graphs_replayed` and `graphs_eager` since the last log, `graphs_fill` (the replayed rows' real tokens
    over the captured tokens computed for them), and the eager forwards' reasons once each."""

    def __init__(self, path: TrainingPath):
        self.path = path
        self.graphs = None
        self._seen = (0, 0, 0, 0)
        self._reasons: set = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        ours = falcon_model(model)
        self.graphs = enable_training_graphs(
            ours,
            1,
            self.path.graph_tokens,
            max_docs=self.path.graph_doc_slots,
            compile=self.path.compile_layers,
            max_doc_len=self.path.graph_doc_len,
            budgets=self.path.graph_budgets,
        )
        logger.info("training graphs captured: %s", self.graphs.settings)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.graphs is None or logs is None:
            return
        g = self.graphs
        now = (g.replayed, sum(g.eager.values()), g.real_tokens, g.captured_tokens)
        replayed, eager, real, captured = (a - b for a, b in zip(now, self._seen))
        logs["graphs_replayed"], logs["graphs_eager"] = replayed, eager
        if captured:
            logs["graphs_fill"] = round(real / captured, 4)
        self._seen = now
        for reason in set(self.graphs.eager) - self._reasons:
            logger.warning("training graphs: a micro-batch ran eagerly (%s)", reason)
            self._reasons.add(reason)
