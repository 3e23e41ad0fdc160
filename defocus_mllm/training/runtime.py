"""What every recipe does around the Trainer: logging set up as transformers does, which checkpoint to resume (never
a half-written one), a clean stop on SIGTERM (`StopOnSignal`) and a clean exit of a distributed run
(`distributed_exit`)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..files import find_corrupt_files

logger = logging.getLogger(__name__)

# What `Trainer.save_model` writes, whatever the setup (full model, sharded, LoRA adapter, DeepSpeed engine state).
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def setup_logging(args: TrainingArguments) -> None:
    """INFO logs on the main process, warnings elsewhere (transformers' convention)."""
    import transformers

    level = logging.INFO if args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)
    logging.getLogger("defocus_mllm").setLevel(level)


def use_cpu_threads(args: TrainingArguments, threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads for a CPU run and return them; a GPU run is left alone.

    `threads` wins when given. Otherwise a single-process run takes every core it may use when `OMP_NUM_THREADS` is
    unset or 1: `accelerate launch` without a config starts its one CPU process with OMP_NUM_THREADS=1, which would
    leave every other core idle (docs/easy_vqa.md has the slowdown). Any other OMP_NUM_THREADS is respected, and
    several processes keep what the launcher gave each.
    """
    if args.device.type != "cpu":
        return torch.get_num_threads()
    if threads is None and args.world_size == 1 and os.environ.get("OMP_NUM_THREADS", "1") == "1":
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"cpu_threads={threads}: must be at least 1")
        torch.set_num_threads(threads)
        logger.info("CPU run: %d intra-op thread(s)", threads)
    return torch.get_num_threads()


# glibc's mallopt parameters (malloc.h) and the values `keep_freed_memory` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRIM_THRESHOLD_BYTES = 1 << 30
_MMAP_THRESHOLD_BYTES = 32 << 20  # the largest glibc accepts on 64-bit


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a training step frees for the next step, instead of handing it back to
    the kernel; returns whether it could (False off glibc, where nothing changes).

    By default glibc returns free memory at the top of its heap once a few MB of it are free, and serves blocks
    above a moving threshold by mmap / munmap, so every CPU step of a small model maps and zeroes fresh pages for
    its activations again: ~6,000 page faults per warm-up step of the offline default and 6% of its CPU time in the
    kernel (docs/easy_vqa.md). With blocks up to 32 MB from the heap and the heap trimmed only past 1 GB of free
    memory, the same pages serve every step. The process's memory then stays near its peak, which is what a
    training run holds every step anyway.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only: another C library's mallopt takes other numbers
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))


def checkpoint_problem(path: str | os.PathLike) -> Optional[str]:
    """Why a `checkpoint-*` directory cannot be resumed from; None when it is complete.

    The Trainer writes `trainer_state.json` last (after the weights, optimizer, scheduler and RNG states), so a save
    killed midway leaves a directory without it; a readable state, a weights file and readable `.safetensors`
    headers make a complete checkpoint.
    """
    path = Path(path)
    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the Trainer writes it last: the save was interrupted)"
    try:
        json.loads(state.read_text())
    except ValueError:
        return "trainer_state.json is truncated"
    if not any((path / name).is_file() for name in WEIGHTS_FILES) and not any(path.glob("global_step*")):
        return "no model weights"
    bad = find_corrupt_files(path)
    if bad:
        return f"{bad[0][0].name} is truncated or corrupt ({bad[0][1]})"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Optional[str]:
    """The newest complete `checkpoint-<step>` in `output_dir` (None if there is none); incomplete ones newer than it
    are skipped with a warning that names them."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(((int(m.group(1)), entry) for entry in os.listdir(output_dir)
                    if (m := re.fullmatch(r"checkpoint-(\d+)", entry))
                    and os.path.isdir(os.path.join(output_dir, entry))), reverse=True)
    for _, entry in steps:
        path = os.path.join(output_dir, entry)
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping incomplete checkpoint %s: %s", path, problem)
    return None


def resolve_resume_checkpoint(args: TrainingArguments) -> Optional[str]:
    """`--resume_from_checkpoint last`: the newest complete `checkpoint-*` in `output_dir` (half-written ones are
    skipped and named; a fresh start when there is none). A checkpoint named explicitly must be a complete directory;
    the recipes call this before preparing data or building a model, so a wrong name fails at once."""
    resume = args.resume_from_checkpoint
    if resume == "last":
        return last_complete_checkpoint(args.output_dir)
    if resume and not os.path.isdir(resume):
        # the Trainer would only find out after data preparation and the model build, and read it as a Hub repo id
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such directory; name a checkpoint-<step> "
                                f"folder, or pass 'last' for the newest complete one in --output_dir")
    if resume:
        problem = checkpoint_problem(resume)
        if problem is not None:
            raise ValueError(f"{resume} is incomplete ({problem}); resume from an earlier checkpoint, or pass "
                             f"--resume_from_checkpoint last to take the newest complete one")
    return resume


class StopOnSignal(TrainerCallback):
    """On SIGTERM (what cluster schedulers send before preempting or timing out a job), save a checkpoint at the
    next step boundary and stop training; the recipes then exit with status 0 instead of finishing the run.

    The handler is installed when training begins and the previous one restored when it ends; before that the
    signal has its usual effect. Dataloader worker processes ignore the first SIGTERM (a signal to the whole process
    group, or Slurm's to every process of the job, reaches them too; dying, they would crash the step before its
    checkpoint); a second one, one after the training process is gone, or one while it exits ends them (an error or
    a Ctrl-C exits through multiprocessing's exit handler, which sends each worker one SIGTERM and waits for it). With several processes the
    decision is taken together (an all-reduce per step), so that every rank saves the same step even if the signal
    reached only some of them. A process started by `accelerate launch` also asks Linux to send it SIGTERM when the
    launcher dies: single-process launchers before accelerate 1.16 do not forward signals, so `kill <launcher>`
    would otherwise leave the training running (1.16 forwards SIGTERM and kills the process 5 s later).

    After `trainer.train()`, `interrupted` tells whether the run stopped this way and `report(trainer, metrics)` says
    where the checkpoint is.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)) -> None:
        self.signals = tuple(signals)
        self.received: Optional[str] = None
        self.stopped_at: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def interrupted(self) -> bool:
        return self.stopped_at is not None

    def _handle(self, signum: int, frame) -> None:  # only records: the training loop acts at the step boundary
        self.received = self.received or signal.Signals(signum).name

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
            follow_launcher()
        dataloader = kwargs.get("train_dataloader")
        base = getattr(dataloader, "base_dataloader", dataloader)  # accelerate wraps the torch DataLoader
        if base is not None and hasattr(base, "worker_init_fn") and not isinstance(base.worker_init_fn,
                                                                                    _WorkersOutliveSignal):
            base.worker_init_fn = _WorkersOutliveSignal(base.worker_init_fn, self.signals, _exit_flag())

    def _agreed(self, args: TrainingArguments) -> bool:
        flag = self.received is not None
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            tensor = torch.tensor([int(flag)], device=args.device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = bool(tensor.item())
        return flag

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.stopped_at is None and self._agreed(args):
            self.received = self.received or "SIGTERM"  # a rank the signal did not reach follows the others
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                logger.warning("%s received: saving checkpoint-%d and stopping", self.received, state.global_step)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.stopped_at == state.global_step:
            control.should_save = False  # saved already at the step boundary

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def report(self, trainer, metrics: dict) -> dict:
        """Say (on the main process) where the checkpoint of the interrupted run is and how to go on; returns
        `metrics` with `interrupted_at_step`, what the recipes return instead of finishing the run."""
        if trainer.is_world_process_zero():
            path = Path(trainer.args.output_dir) / f"checkpoint-{self.stopped_at}"
            print(f"{self.received} received: stopped at step {self.stopped_at}, checkpoint saved to {path}; continue "
                  f"with --resume_from_checkpoint last", flush=True)
        return {**metrics, "interrupted_at_step": self.stopped_at}


class _WorkersOutliveSignal:
    """A dataloader `worker_init_fn` (wrapping the Trainer's) after which the worker ignores the first of `signals`
    while its training process lives and is not exiting; picklable, for the `spawn` start method.

    `exiting` is a flag in shared memory that the training process sets when it starts to exit (`_exit_flag`): the
    SIGTERM that multiprocessing's exit handler then sends is the training process's own, not a scheduler's, and
    must end the worker, or the exit waits for it forever.
    """

    def __init__(self, worker_init_fn, signals: Sequence[int], exiting) -> None:
        self.worker_init_fn, self.signals, self.exiting = worker_init_fn, tuple(signals), exiting

    def __call__(self, worker_id: int) -> None:
        parent = os.getppid()
        exiting = self.exiting

        def once(signum, frame):
            signal.signal(signum, signal.SIG_DFL)  # a second signal ends the worker
            if exiting.value or os.getppid() != parent:  # the training process exits or is gone: stop serving it
                os.kill(os.getpid(), signum)

        for signum in self.signals:
            signal.signal(signum, once)
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)


_EXIT_FLAG = None


def _exit_flag():
    """This process's "exiting" flag in shared memory (made once, set by an exit hook), inherited by its dataloader
    workers.

    The hook is registered after multiprocessing's own (imported long before training starts), and exit hooks run
    last-registered first, so the flag is set before multiprocessing signals and joins the workers.
    """
    global _EXIT_FLAG
    if _EXIT_FLAG is None:
        _EXIT_FLAG = multiprocessing.RawValue(ctypes.c_bool, False)
        atexit.register(setattr, _EXIT_FLAG, "value", True)
    return _EXIT_FLAG


def follow_launcher(signum: int = signal.SIGTERM) -> bool:
    """If this process was started by `accelerate launch`, have Linux send it `signum` when the launcher dies
    (`PR_SET_PDEATHSIG`); returns whether it was set. Elsewhere (another parent, another OS) nothing changes: a
    process started from a shell keeps running after the shell exits, as `nohup` users expect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        words = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    names = [os.path.basename(word) for word in words]
    if not (("accelerate" in names and "launch" in names) or "accelerate.commands.launch" in names):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signum), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the launcher died before the request was made
        os.kill(os.getpid(), signum)
    return True


@contextlib.contextmanager
def distributed_exit() -> Iterator[None]:
    """Around a script's `main()`: when it returns, wait for every rank, then destroy the process group.

    A process that exits with its gloo process group alive can abort at interpreter shutdown ("terminate called
    without an active exception", SIGABRT): the group's worker threads still hold work objects when the C++ runtime
    is torn down. It happens at random (how often: docs/evaluation.md, "Several processes"), and the
    aborting rank makes the launcher kill its peer, possibly in the middle of the peer's last checkpoint save. The
    barrier first lets every rank finish what it writes (the final save) before any group goes away.

    An exception is re-raised with the group left alone: its peers may be blocked in a collective this rank never
    joins, and destroying a group under them could hang; the launcher stops them once this process ends.
    """
    yield
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


__all__ = ["StopOnSignal", "checkpoint_problem", "distributed_exit", "follow_launcher", "keep_freed_memory",
           "last_complete_checkpoint", "resolve_resume_checkpoint", "setup_logging"]
