"""Shared prefixes of sampling runs: a search's candidates often begin with the same steps, so a state reached once
need not be computed again.

Two schedules that agree on the sampler, on every timestep and on the kind (and branch) of their first i steps
reach the same latents before step i, on the same noise and conditioning. When step i is a full step, nothing else
carries over from the steps before it: the full call refreshes the engine's cache and the last prediction, so the
latents and the scheduler's own state (a multistep solver's history, its step index) are the whole state. A
`PrefixCache` keeps those states (bounded by bytes, least recently used out first) and hands back the longest one
a new schedule can resume from. The result is bit-identical to a run from the start: the same operations run on
the same values (tests/test_prefixes.py checks it).

A cache belongs to one model, noise, conditioning and noise schedule (a search's fitness): `bind` clears it when
any of them changes.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .schedule import Schedule, StepKind

# instance attributes of a scheduler that are not its state: the engine's wrappers (runs.watch_scheduler)
_NOT_STATE = ("set_timesteps", "step")
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: some 1,300 states of a 256-sample search on the 16x16 digits (0.8 MB each)


@dataclass
class Resume:
    step: int  # the first step still to run
    latents: torch.Tensor
    scheduler_state: dict


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _copy(value: Any) -> Any:
    """A deep copy in which tensors are detached clones (a solver's history may carry an autograd graph)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    if isinstance(value, dict) and type(value) is dict:
        return {k: _copy(v) for k, v in value.items()}
    return copy.deepcopy(value)


def scheduler_state(scheduler) -> dict:
    """A copy of the scheduler's state (its instance attributes but the engine's wrappers)."""
    return {k: _copy(v) for k, v in vars(scheduler).items() if k not in _NOT_STATE}


def restore_scheduler(scheduler, state: dict) -> None:
    """Put a copy of `state` back (a copy: the solver mutates its history lists in place)."""
    vars(scheduler).update(_copy(state))


class PrefixCache:
    """States of sampling runs before their full steps, keyed by what produced them."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._states: OrderedDict[tuple, tuple[torch.Tensor, dict, int]] = OrderedDict()
        self._bytes = 0
        self._bound: tuple | None = None
        self.steps_skipped = 0  # sampler steps resumed past instead of run (all batches)

    def bind(self, model, noise: torch.Tensor, cond, scheduler_config: dict | None = None) -> None:
        """Use the cache for this model, noise, conditioning and noise schedule (the same objects); another one
        empties it first."""
        bound = (id(model), id(noise), id(cond), id(scheduler_config))
        if bound != self._bound:
            self.clear()
            self._bound = bound

    def clear(self) -> None:
        self._states.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._states)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @staticmethod
    def _key(schedule: Schedule, timesteps: torch.Tensor, batch: int, i: int) -> tuple:
        return (batch, schedule.sampler, tuple(timesteps.tolist()),
                tuple((s.kind.value, s.branch) for s in schedule.steps[:i]))

    @staticmethod
    def resumable(schedule: Schedule, i: int) -> bool:
        """Whether the state before step i is a whole state (step i is full, and not the first)."""
        return 0 < i < schedule.num_steps and schedule.steps[i].kind is StepKind.FULL

    def lookup(self, schedule: Schedule, timesteps: torch.Tensor, batch: int) -> Resume | None:
        """The latest state this schedule can resume from, for the batch starting at row `batch`."""
        for i in range(schedule.num_steps - 1, 0, -1):
            if not self.resumable(schedule, i):
                continue
            key = self._key(schedule, timesteps, batch, i)
            hit = self._states.get(key)
            if hit is not None:
                self._states.move_to_end(key)
                latents, state, _ = hit
                self.steps_skipped += i
                return Resume(step=i, latents=latents.clone(), scheduler_state=state)
        return None

    def store(self, schedule: Schedule, timesteps: torch.Tensor, batch: int, i: int, latents: torch.Tensor,
              scheduler) -> None:
        """Keep the state before step i (a no-op where step i is not full, or the state would not fit at all)."""
        if not self.resumable(schedule, i):
            return
        key = self._key(schedule, timesteps, batch, i)
        if key in self._states:
            self._states.move_to_end(key)
            return
        state = scheduler_state(scheduler)
        size = _nbytes(latents) + _nbytes(state)
        if size > self.max_bytes:
            return
        self._states[key] = (latents.detach().clone(), state, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, _, dropped) = self._states.popitem(last=False)
            self._bytes -= dropped


__all__ = ["PrefixCache", "Resume", "restore_scheduler", "scheduler_state"]
