"""SIGTERM, what a cluster sends before it preempts a job: the run finishes its optimizer step, saves a resumable
checkpoint through the trainer's sealed path (`rlsd.infra.checkpoint.staged`), and exits with status 143 (128 +
SIGTERM, what a process killed by it reports) after one line naming the checkpoint. A second SIGTERM stops at once.

The signal handler only sets a flag (it runs between two bytecodes of the main thread); `SigtermStop`, a
`TrainerCallback`, reads it at the end of every optimizer step, agreed across processes, and asks HF's loop to save
and stop (`control.should_save`, `control.should_training_stop`). `stop_on_sigterm` installs both around
`Trainer.train` and restores the previous handler afterwards."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
"""The exit status of a run stopped by SIGTERM after saving (143), as a process killed by the signal reports it."""


class Preempted(SystemExit):
    """Raised by `RLSDTrainer.train` once a SIGTERM has been answered with a checkpoint: uncaught, the process exits
    with status 143 (`PREEMPTED_EXIT_CODE`); `checkpoint` is the folder to resume from."""

    def __init__(self, checkpoint: str, step: int) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.checkpoint, self.step = checkpoint, step

    def __str__(self) -> str:
        return (
            f"rlsd: stopped by SIGTERM after optimizer step {self.step}; resumable checkpoint saved in "
            f"{self.checkpoint} (resume with --resume_from_checkpoint {self.checkpoint}, or true for the latest)"
        )


def any_process(accelerator: Any) -> Callable[[bool], bool]:
    """Whether any process's flag is set (a sum over processes, one scalar per step; the flag itself with one
    process), so that every process saves and stops at the same step."""

    def agree(flag: bool) -> bool:
        if accelerator.num_processes <= 1:
            return flag
        total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
        return bool(total.item() > 0)

    return agree


class SigtermStop(TrainerCallback):
    """Turns a received SIGTERM (`handle`) into a save and a stop at the end of the current optimizer step, and records
    the checkpoint written then (`saved`, its `step`)."""

    def __init__(self, agree: Callable[[bool], bool]) -> None:
        self.agree = agree
        self.received = False
        self.previous: Any = signal.SIG_DFL
        self.stop_step: int | None = None
        self.saved: str | None = None

    def handle(self, signum: int, frame: Any) -> None:
        """The SIGTERM handler: sets the flag; a second SIGTERM gets the previous handler's behaviour at once."""
        if self.received:
            signal.signal(signal.SIGTERM, self.previous)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.received = True
        os.write(2, b"rlsd: SIGTERM received: finishing this optimizer step, then saving a checkpoint and stopping\n")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """After each optimizer step: when any process got SIGTERM, save (HF's `_save_checkpoint`) and stop."""
        if self.agree(self.received):
            control.should_save = True
            control.should_training_stop = True
            self.stop_step = state.global_step
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """The checkpoint of the stopping step has been written and sealed: remember its folder."""
        if self.stop_step is not None and state.global_step == self.stop_step:
            self.saved = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return control


@contextlib.contextmanager
def stop_on_sigterm(
    add_callback: Callable[[Any], None], remove_callback: Callable[[Any], None], accelerator: Any
) -> Iterator[SigtermStop]:
    """Around `Trainer.train`: a SIGTERM finishes the optimizer step, saves a checkpoint and, once training has
    returned, raises `Preempted` (exit status 143) after printing its one line on the main process. The handler is
    installed from the main thread only (elsewhere Python cannot; the callback still takes part in the agreement),
    and the previous handler is restored however training ends."""
    stop = SigtermStop(any_process(accelerator))
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        stop.previous = signal.signal(signal.SIGTERM, stop.handle)
        if stop.previous is None:  # installed from C: restoring it is not possible, the default is the closest
            stop.previous = signal.SIG_DFL
    else:
        logger.info("training outside the main thread: SIGTERM is not handled (no checkpoint on preemption)")
    add_callback(stop)
    try:
        yield stop
    finally:
        remove_callback(stop)
        if main_thread:
            signal.signal(signal.SIGTERM, stop.previous)
    if stop.saved is not None:
        preempted = Preempted(stop.saved, stop.stop_step)
        if accelerator.is_main_process:
            print(preempted, file=sys.stderr, flush=True)
        raise preempted
    if stop.received:
        logger.warning("SIGTERM arrived after the last optimizer step: training completed, nothing was cut short")
