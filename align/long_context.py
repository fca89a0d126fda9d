"""SFT with context parallelism: every packed row split over the ranks (`context_parallel_size` in a recipe).

    accelerate launch --num_processes 8 align/sft.py --config <recipe> --context_parallel_size 2   # 4 × 2

The processes form groups of `context_parallel_size` consecutive ranks. The ranks of a group read the same
batches (they split rows, not data); the groups read different batches, as data-parallel ranks do. Each rank runs
its slice of the row through falcon-align's exact context-parallel model (model/context_parallel.py) on its
group's own process group, so the model's collectives never interleave with DDP's gradient all-reduce. A rank's
loss is its summed token loss scaled so that DDP's average over all ranks gives Σ token losses / tokens over
all groups and micro-batches — what transformers gives plain data parallelism (see compute_loss).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from trl import SFTTrainer

from model.context_parallel import enable_context_parallel, next_token_targets, row_multiple, shard

IGNORE = -100


def pad_row(input_ids, position_ids, labels, multiple):
    """Pads a (1, L) packed row to a multiple of `multiple` with one extra document that trains nothing."""
    extra = (-input_ids.size(1)) % multiple
    if not extra:
        return input_ids, position_ids, labels
    pad = lambda t, value: F.pad(t, (0, extra), value=value)
    tail_positions = torch.arange(extra, device=position_ids.device)[None]  # restarts at 0: its own document
    return pad(input_ids, 0), torch.cat([position_ids, tail_positions], dim=1), pad(labels, IGNORE)


class ContextParallelSFTTrainer(SFTTrainer):
    def __init__(self, *args, context_parallel_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world % context_parallel_size:
            raise ValueError(f"context_parallel_size={context_parallel_size} must divide the {world} processes")
        if not self.padding_free:  # TRL: padding_free, or packing with a bfd strategy
            raise ValueError("context parallelism splits packed rows: set packing: true (padding-free)")
        self.cp_size, self.dp_size = context_parallel_size, world // context_parallel_size
        self.dp_index = dist.get_rank() // context_parallel_size
        for g in range(self.dp_size):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(g * context_parallel_size, (g + 1) * context_parallel_size)))
            if g == self.dp_index:
                self.cp_group = group  # the model's collectives, apart from DDP's
        enable_context_parallel(self.model, self.cp_group)

    def get_train_dataloader(self):
        """The same batches on every rank of a group: Trainer's sampler, made seedable by accelerate as usual,
        sharded over the groups as data-parallel ranks would be (one group: what one process would see)."""
        dataset = self._remove_unused_columns(self.train_dataset, description="training")
        loader = DataLoader(
            dataset,
            batch_size=self._train_batch_size,
            sampler=self._get_train_sampler(dataset),
            collate_fn=self.data_collator,
            drop_last=self.args.dataloader_drop_last,
            num_workers=self.args.dataloader_num_workers,
        )
        acc = self.accelerator
        prepared = prepare_data_loader(
            loader,
            acc.device,
            num_processes=self.dp_size,
            process_index=self.dp_index,
            put_on_device=True,
            rng_types=acc.rng_types.copy(),
            use_seedable_sampler=acc.use_seedable_sampler,
            data_seed=acc.dataloader_config.data_seed,
        )
        acc._dataloaders.append(prepared)  # so the Trainer's epoch bookkeeping reaches its sampler
        return prepared

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        row = (inputs["input_ids"], inputs["position_ids"], inputs["labels"])
        ids, positions, labels = pad_row(*row, row_multiple(self.cp_size))  # 2 chunks per rank
        local = shard(ids, positions, labels, group=self.cp_group)
        out = model(
            input_ids=local["input_ids"],
            position_ids=local["position_ids"],
            shift_labels=local["shift_labels"],
            num_items_in_batch=1,  # a sum: the ranks' parts add up
        )
        if num_items_in_batch is not None:
            # Trainer's count: scored tokens of all micro-batches on all ranks, each row counted by every rank of
            # its group. × world because DDP averages over ranks: the gradient is then Σ token losses / tokens,
            # exactly what transformers gives plain data parallelism (average_tokens_across_devices).
            loss = out.loss * dist.get_world_size() * self.cp_size / num_items_in_batch
        else:  # this row's mean, averaged over groups (the Trainer divides by gradient accumulation)
            targets = (next_token_targets(positions, labels) != IGNORE).sum()
            loss = out.loss * self.cp_size / targets.clamp(min=1)
        return (loss, out) if return_outputs else loss
