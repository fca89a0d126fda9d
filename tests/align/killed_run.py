"""A run of align/sft.py that SIGKILLs itself at a chosen moment, for the resume tests (a subprocess, CPU).

    python -m tests.align.killed_run step:5 <sft arguments>   # right after optimizer step 5, between steps
    python -m tests.align.killed_run save:6 <sft arguments>   # while checkpoint-6 is written: its weights on disk,
                                                              # optimizer.pt created but still empty, no
                                                              # trainer_state.json yet

Killing itself at an exact point makes the test deterministic; the signal is the real SIGKILL, so nothing runs
after it (no handler, no flush, no cleanup).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from transformers import Trainer, TrainerCallback


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            _kill()


def kill_during_save(step: int) -> None:
    """Patches the Trainer so that saving checkpoint-`step` dies after the weights, inside the optimizer's file."""
    save_optimizer = Trainer._save_optimizer_and_scheduler

    def dying(self, output_dir):
        if self.state.global_step == step:
            (Path(output_dir) / "optimizer.pt").touch()  # opened for writing, nothing written yet
            _kill()
        save_optimizer(self, output_dir)

    Trainer._save_optimizer_and_scheduler = dying


def kill_after_step(step: int) -> None:
    """Adds the killing callback to every Trainer built from here on."""
    init = Trainer.__init__

    def with_callback(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(KillAfterStep(step))

    Trainer.__init__ = with_callback


def main(argv: list[str]) -> None:
    when, step = argv[0].split(":")
    {"save": kill_during_save, "step": kill_after_step}[when](int(step))
    from align import sft

    sft.main(argv[1:])
    raise SystemExit(f"the run finished: it was not killed at {argv[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
