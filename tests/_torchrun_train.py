"""What tests/test_distributed.py launches under torchrun: ``sketchcolor train`` with its
command-line arguments, recording every write this process makes under ``--out``.

Writes are seen through Python's audit hooks (opening a file for writing, renames, deletions,
new folders) and listed in ``$SKETCHCOLOR_TEST_WRITES_DIR/rank-<RANK>.txt``. With
``$SKETCHCOLOR_TEST_KILL_AFTER_CHECKPOINT=<step>``, rank 0 kills itself (SIGKILL: no cleanup, no
flush) right after writing the checkpoint of that step, as a crashed node would. With
``$SKETCHCOLOR_TEST_NONFINITE_AT_STEP=<step>``, every rank's ground truth of that step is NaN (so
the run stops with its last good state), and rank 0 writes its checkpoints slowly.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import sketchcolor.train as train_module
from sketchcolor.cli import main

# Audit events that change the file system, and the argument holding the path written.
WRITE_EVENTS = {"os.rename": 1, "os.remove": 0, "os.rmdir": 0, "os.mkdir": 0, "os.truncate": 0}
WRITE_MODES = ("w", "a", "x", "+")


def record_writes_under(out: Path, log) -> None:
    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = any(letter in mode for letter in WRITE_MODES) if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        elif event in WRITE_EVENTS:
            path, writes = args[WRITE_EVENTS[event]], True
        else:
            return
        if writes and isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(out):
            log.write(f"{event} {path}\n")
            log.flush()

    sys.addaudithook(hook)


def kill_after_checkpoint(step: int) -> None:
    save_checkpoint = train_module.save_checkpoint

    def save_then_die(trainer, out, state=None):
        path = save_checkpoint(trainer, out, state)
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    train_module.save_checkpoint = save_then_die


def non_finite_at(step: int, slow_rank_0: bool) -> None:
    run_step, save_checkpoint = train_module.train_step, train_module.save_checkpoint
    calls = 0

    def poisoned_step(loss, micro_batches, *args):
        nonlocal calls
        calls += 1
        if calls == step:
            for batch in micro_batches:
                batch["ground_truth"] = batch["ground_truth"] * float("nan")
        return run_step(loss, micro_batches, *args)

    def slow_save(trainer, out, state=None):
        # A real checkpoint (about 1 GB at the paper's width) takes seconds to write: long enough
        # for a rank that did not wait for it to exit and have torchrun stop this one.
        time.sleep(3)
        return save_checkpoint(trainer, out, state)

    train_module.train_step = poisoned_step
    if slow_rank_0:
        train_module.save_checkpoint = slow_save


if __name__ == "__main__":
    arguments = sys.argv[1:]
    out = Path(os.path.abspath(arguments[arguments.index("--out") + 1]))
    # Opened before the hook is installed, so that writing the log is not itself recorded.
    writes_log = open(Path(os.environ["SKETCHCOLOR_TEST_WRITES_DIR"]) / f"rank-{os.environ['RANK']}.txt", "w")
    record_writes_under(out, writes_log)
    if "SKETCHCOLOR_TEST_KILL_AFTER_CHECKPOINT" in os.environ and os.environ["RANK"] == "0":
        kill_after_checkpoint(int(os.environ["SKETCHCOLOR_TEST_KILL_AFTER_CHECKPOINT"]))
    if "SKETCHCOLOR_TEST_NONFINITE_AT_STEP" in os.environ:
        non_finite_at(int(os.environ["SKETCHCOLOR_TEST_NONFINITE_AT_STEP"]), slow_rank_0=os.environ["RANK"] == "0")
    sys.exit(main(arguments))
