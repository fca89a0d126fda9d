"""SFT with context parallelism: every packed row split over the ranks (`context_parallel_size` in a recipe).

    accelerate launch --num_processes 2 align/sft.py --config <recipe> --context_parallel_size 2

All ranks read the same batches (they split rows, not data); each runs its slice of the row through
falcon-align's exact context-parallel model (model/context_parallel.py) on a process group of its own, so the
model's collectives never interleave with DDP's gradient all-reduce. The loss of a rank is its summed token loss
× world / the row's token count: DDP's gradient average then equals the gradient of the whole row's mean loss.
Pure context parallelism for now (world size = context_parallel_size); data parallelism across groups is not
wired yet.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from trl import SFTTrainer

from model.context_parallel import enable_context_parallel, next_token_targets, shard

IGNORE = -100


def pad_row(input_ids, position_ids, labels, multiple):
    """Pads a (1, L) packed row to a multiple of the world size with one extra document that trains nothing."""
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
        if world != context_parallel_size:
            raise ValueError(
                f"context_parallel_size={context_parallel_size} needs exactly that many processes (got {world}); "
                "data parallelism across context-parallel groups is not supported yet"
            )
        if not self.padding_free:  # TRL: padding_free, or packing with a bfd strategy
            raise ValueError("context parallelism splits packed rows: set packing: true (padding-free)")
        self.cp_group = dist.new_group(list(range(world)))  # the model's collectives apart from DDP's
        enable_context_parallel(self.model, self.cp_group)

    def get_train_dataloader(self):
        """The same batches on every rank, in the order one process would see them: Trainer's sampler, made
        seedable by accelerate as usual, but prepared as for a single process (no per-rank sharding)."""
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
            num_processes=1,
            process_index=0,
            put_on_device=True,
            rng_types=acc.rng_types.copy(),
            use_seedable_sampler=acc.use_seedable_sampler,
            data_seed=acc.dataloader_config.data_seed,
        )
        acc._dataloaders.append(prepared)  # so the Trainer's epoch bookkeeping reaches its sampler
        return prepared

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        world = dist.get_world_size(self.cp_group)
        ids, positions, labels = pad_row(inputs["input_ids"], inputs["position_ids"], inputs["labels"], world)
        local = shard(ids, positions, labels, group=self.cp_group)
        targets = (next_token_targets(positions, labels) != IGNORE).sum()  # the whole row's, alike on all ranks
        out = model(
            input_ids=local["input_ids"],
            position_ids=local["position_ids"],
            shift_labels=local["shift_labels"],
            num_items_in_batch=1,  # a sum: the ranks' parts add up
        )
        loss = out.loss * world / targets.clamp(min=1)
        return (loss, out) if return_outputs else loss
