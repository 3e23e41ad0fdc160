"""Splitting the questions over the processes of ``accelerate launch`` and gathering the answers (accelerate is
optional: without it there is one process)."""

from __future__ import annotations

import os

import torch


class _SingleProcess:
    """What the evaluation reads of accelerate's state, for one process."""

    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self):
        pass


def distributed_state():
    """accelerate's ``PartialState`` (a single-process stand-in without accelerate).

    On a machine without CUDA, ``accelerate launch --multi_gpu --num_processes N`` starts N processes
    but ``PartialState()`` would leave each of them alone (it only uses gloo when asked for the CPU),
    so all N would answer every question and write the same files. Asking for the CPU when the
    launcher's ``WORLD_SIZE`` says there are several processes joins them into one gloo group.
    """
    try:
        from accelerate import PartialState
    except ImportError:
        return _SingleProcess()
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return PartialState(cpu=True)
    return PartialState()


def is_main_process() -> bool:
    """True in the process that writes the outputs (always, without ``accelerate launch``)."""
    return distributed_state().is_main_process


def split_between(state, items: list) -> list:
    """This process's share. Shares are padded to equal length (the last item repeats) so every process
    runs the same number of batches, which DeepSpeed ZeRO-3 needs; repeated answers are dropped later."""
    if state.num_processes == 1 or not items:
        return items
    with state.split_between_processes(items, apply_padding=True) as mine:
        return list(mine)


def gather(state, obj: list) -> list:
    """Every process's list, concatenated, on every process."""
    if state.num_processes == 1:
        return obj
    from accelerate.utils import gather_object

    return gather_object(obj)
