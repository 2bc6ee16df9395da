"""A sampling run as the step engine sees it: its state, where a call's timestep falls in the scheduler's
list, whether the scheduler fits the schedule, and the scheduler's own methods watched on the instance.

The engine (engine.py) decides what each call does; this module holds what that decision reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .errors import FlexdiffError
from .samplers import FLOW_SAMPLERS, SCHEDULER_CLASSES
from .schedule import Schedule, StepKind

SLOTS = 4  # calls per step a run keeps apart (guidance in two calls uses 2); more grow the lists


@dataclass
class EngineRun:
    """Per-run state: which step comes next, what the last full step cached, the last output."""

    index: int = -1  # the schedule step of the last call (-1: none yet)
    slot: int = 0  # which call of that step (guidance in two calls: 0 and 1)
    mode: StepKind = StepKind.FULL
    branch: int = 0
    units: int = 0  # cache units hooked
    # cache[slot][unit]: the unit's output at the last full step; last_output[slot]: the last noise prediction.
    # Fixed-size lists, filled in place: a compiled denoiser's guards see the same containers at every step.
    cache: list[list[Any]] = field(default_factory=list)
    last_output: list[Any] = field(default_factory=list)
    expert: int = 0  # with a mixture: the expert of the last full step
    # host-side plan of the next call, kept by the scheduler wrappers (what a compiled call reads)
    position: int | None = None  # the step the next call belongs to (None: not known before the first step)
    planned: tuple[StepKind, int] = (StepKind.FULL, 0)  # kind and branch of that step
    planned_expert: int | None = None  # with a mixture: the expert of that step if it is full
    next_slot: int = 0  # calls already made at that step
    cached_slots: tuple[bool, ...] = ()  # which slots had a last output when the step was planned
    compiled_calls: bool = False  # calls of the planned step ran compiled: the host counts them at the step's end
    error: str | None = None  # a scheduler that does not fit the schedule, found when the run was set up

    def __post_init__(self):
        self.cache = [[None] * self.units for _ in range(SLOTS)]
        self.last_output = [None] * SLOTS

    def grow(self, slot: int) -> None:
        """Room for call `slot` of a step (a pipeline that calls the denoiser more than SLOTS times per step)."""
        while slot >= len(self.last_output):
            self.cache.append([None] * self.units)
            self.last_output.append(None)


def place_timestep(t, timesteps, what: str) -> int:
    """The position of timestep `t` in the scheduler's `timesteps` (refused when absent or repeated).

    Exact where the pipeline passes the scheduler's own value; else the nearest one, if it is clearly the nearest
    (closer than half the next one, within 0.5% of the largest timestep): FLUX's pipeline passes t / 1000 in the
    latents' dtype, which comes back as t only to within rounding (bfloat16: 0.4%)."""
    value = float(torch.as_tensor(t).reshape(-1)[0])
    ts = torch.as_tensor(timesteps).double().cpu()
    found = (ts == value).nonzero()
    if len(found) == 0 and len(ts):
        gaps = (ts - value).abs()
        order = gaps.argsort()
        near = float(gaps[order[0]])
        second = float(gaps[order[1]]) if len(ts) > 1 else float("inf")
        if near < 0.5 * second and near <= 0.005 * float(ts.abs().max()):
            return int(order[0])
    if len(found) != 1:
        raise FlexdiffError(
            f"the {what} at timestep {value:g}, which is {'not one' if not len(found) else 'more than one'} "
            f"of the scheduler's {len(timesteps)} timesteps: flexdiff cannot tell which step of the schedule "
            "this call is")
    return int(found[0])


def scheduler_mismatch(sched: Any, want: Schedule) -> str | None:
    """Why a pipeline's scheduler does not fit the schedule (kind, step count, timesteps); None if it does."""
    cls = SCHEDULER_CLASSES[want.sampler]
    if not isinstance(sched, cls):
        return (f"the schedule was made for {want.sampler} ({cls.__name__}) but the pipeline uses "
                f"{type(sched).__name__}; set pipe.scheduler = flexdiff.samplers.make_scheduler"
                f"({want.sampler!r}, pipe.scheduler.config) (or {cls.__name__}.from_config(pipe.scheduler.config))")
    flow_mode = bool(getattr(sched.config, "use_flow_sigmas", False)) or cls is FlowMatchEulerDiscreteScheduler
    if flow_mode != (want.sampler in FLOW_SAMPLERS):
        return (f"the schedule was made for {want.sampler} but the pipeline's {type(sched).__name__} runs in "
                f"{'flow-matching' if flow_mode else 'noise-prediction'} mode; set pipe.scheduler = "
                f"flexdiff.samplers.make_scheduler({want.sampler!r}, pipe.scheduler.config)")
    timesteps = getattr(sched, "timesteps", None)
    n = 0 if timesteps is None else len(timesteps)
    if want.timesteps is not None:
        if n == 0 or [int(t) for t in timesteps] != list(want.timesteps):
            have = "no timesteps set" if n == 0 else f"{[int(t) for t in timesteps]}"
            return (f"the schedule runs its own timesteps {list(want.timesteps)} but the pipeline's scheduler "
                    f"has {have}: call the pipeline with timesteps=list(schedule.timesteps)")
    elif n != want.num_steps:
        return (f"the schedule has {want.num_steps} steps but the pipeline runs "
                f"{n if n else 'none (set_timesteps not called)'}: call it with num_inference_steps={want.num_steps}")
    return None


def _keep_signature(original, replacement):
    """`replacement` in place of a bound method, showing the method's signature (diffusers' pipelines inspect
    `scheduler.set_timesteps` for `timesteps=` / `sigmas=` and `scheduler.step` for `eta=` / `generator=`)."""
    return functools.wraps(original)(replacement)


def watch_scheduler(sched: Any, on_set_timesteps: Callable[[], None],
                    before_step: Callable[[Any], None]) -> Callable[[], None]:
    """Wrap `sched.set_timesteps` (a pipeline call begins with it) and `sched.step` (each step ends with it) on
    this instance only, keeping their signatures: `on_set_timesteps()` after the first, `before_step(timestep)`
    before the second. Returns the function that restores the class's methods."""
    set_timesteps, step = sched.set_timesteps, sched.step

    def set_timesteps_wrapper(*args, **kwargs):
        out = set_timesteps(*args, **kwargs)
        on_set_timesteps()
        return out

    def step_wrapper(model_output, timestep, *args, **kwargs):
        before_step(timestep)
        return step(model_output, timestep, *args, **kwargs)

    sched.set_timesteps = _keep_signature(set_timesteps, set_timesteps_wrapper)
    sched.step = _keep_signature(step, step_wrapper)

    def unwatch() -> None:
        for name in ("set_timesteps", "step"):
            vars(sched).pop(name, None)  # the class's method shows through again

    return unwatch
