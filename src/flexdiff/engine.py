"""The step engine: run a `Schedule` of full / partial / null steps on an unmodified diffusers UNet.

Mechanism (DeepCache, Ma et al. CVPR 2024): the UNet's down path produces skip tensors
s_0 (conv_in) ... s_{K-1}; the up path consumes them in reverse. A partial step at branch `b`
recomputes only the units that produce s_0..s_b and the up units that consume them; every
deeper unit (and the mid block) returns the output it produced at the last full step. A null
step makes no network call and returns the last noise prediction.

Everything is done with diffusers' removable `ModelHook`s on module instances: no forked
UNet code, no class patching. The per-run state (step index, cache) lives in `EngineRun`.

Which step a UNet call is (docs/engine.md): with a scheduler (a pipeline's, or `sample`'s), a
run starts when the pipeline calls `scheduler.set_timesteps` (the engine wraps that method on the
instance), and each call's step is the position of its timestep in `scheduler.timesteps`. So a
run that starts late (img2img `strength`), stops early (interrupted) or calls the UNet more than
once per step (guidance in two calls) stays in step: repeated calls of one step are numbered
slots, each with its own cache. A step whose cache is empty (the first step of a late start, a
new slot) runs full. Without a scheduler every call is the next step (a counter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .anatomy import anatomy
from .errors import FlexdiffError
from .mixture import expert_for_step, experts_of, is_mixture
from .samplers import SCHEDULER_CLASSES
from .schedule import Schedule, StepKind

HOOK_NAME = "flexdiff_step_engine"


@dataclass
class EngineRun:
    """Per-run state: which step comes next, what the last full step cached, the last output."""

    index: int = -1  # the schedule step of the last call (-1: none yet)
    slot: int = 0  # which call of that step (guidance in two calls: 0 and 1)
    mode: StepKind = StepKind.FULL
    branch: int = 0
    cache: dict[tuple[int, int], Any] = field(default_factory=dict)  # (slot, unit) -> its output at the last full step
    last_output: dict[int, Any] = field(default_factory=dict)  # slot -> the last noise prediction
    expert: int = 0  # with a mixture: the expert of the last full step


class _CacheHook(ModelHook):
    """On a unit or block: record its output at full steps, return that record when a partial step skips it."""

    def __init__(self, engine: "StepEngine", key: int, depth: int):
        super().__init__()
        self.engine, self.key, self.depth = engine, key, depth

    def new_forward(self, module, *args, **kwargs):
        run = self.engine.run
        if run.mode is StepKind.PARTIAL and self.depth > run.branch:
            return run.cache[(run.slot, self.key)]
        out = self.fn_ref.original_forward(*args, **kwargs)
        if run.mode is StepKind.FULL:
            run.cache[(run.slot, self.key)] = out
        return out


class _StepHook(ModelHook):
    """On the UNet itself: take the next step of the schedule from the run's counter."""

    def __init__(self, engine: "StepEngine"):
        super().__init__()
        self.engine = engine

    def new_forward(self, module, *args, **kwargs):
        eng = self.engine
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        index, slot = eng.locate(t)
        run = eng.run  # locate may have started a new run
        if run.index == -1 and eng.pipeline_scheduler is not None:
            eng.check_pipeline_scheduler()
        step = eng.schedule.steps[index]
        kind = step.kind
        if kind is not StepKind.FULL and slot not in run.last_output:
            kind = StepKind.FULL  # nothing cached for this call yet (a late start, a new slot): compute it
        run.index, run.slot, run.mode = index, slot, kind
        run.branch = step.branch if step.branch is not None else 0
        if kind is StepKind.NULL:
            out = run.last_output[slot]  # no network call: reuse the last noise prediction
        elif eng.is_mixture:
            # a full step calls the expert of its timestep; a partial step calls the expert of the last
            # full step, whose deep features are the ones in the cache
            run.expert = expert_for_step(kind, torch.as_tensor(t).reshape(-1)[0], run.expert, module.intervals)
            out = self.fn_ref.original_forward(*args, expert=run.expert, **kwargs)
            run.last_output[slot] = out
        else:
            out = self.fn_ref.original_forward(*args, **kwargs)
            run.last_output[slot] = out
        eng.calls[kind.value] += 1
        if eng.pipeline_scheduler is None and index == eng.schedule.num_steps - 1:
            eng.reset()  # counter mode: the next call starts a new run; drop this run's features now
        return out


class StepEngine:
    """Applies a schedule to a UNet through removable hooks.

    >>> with StepEngine(unet, schedule) as engine:
    ...     images = pipeline(num_inference_steps=schedule.num_steps)  # or flexdiff.sampling.sample
    """

    def __init__(self, unet: torch.nn.Module, schedule: Schedule, pipeline_scheduler: Any = None):
        # `unet`: a diffusers UNet, or a flexdiff mixture of experts (one UNet per timestep interval)
        self.unet = unet
        self.pipeline_scheduler = pipeline_scheduler  # checked against the schedule when a run starts
        # a mixture of experts: every expert is hooked; a schedule must fit the one with the fewest branches
        self.anatomies = [anatomy(m) for m in experts_of(unet)]
        self.anatomy = min(self.anatomies, key=lambda a: a.num_branches)
        schedule.check_fits(self.anatomy.num_branches)
        self.schedule = schedule
        self.run = EngineRun()
        self.calls = {k.value: 0 for k in StepKind}  # UNet calls seen, by the kind of step they were
        self._hooked: list[torch.nn.Module] = []

    @property
    def is_mixture(self) -> bool:
        return is_mixture(self.unet)

    @property
    def attached(self) -> bool:
        return bool(self._hooked)

    def set_schedule(self, schedule: Schedule) -> None:
        schedule.check_fits(self.anatomy.num_branches)
        self.schedule = schedule
        self.reset()

    def check_pipeline_scheduler(self) -> None:
        """Refuse a pipeline whose scheduler does not fit the schedule (kind and step count)."""
        sched, want = self.pipeline_scheduler, self.schedule
        cls = SCHEDULER_CLASSES[want.sampler]
        if not isinstance(sched, cls):
            raise FlexdiffError(
                f"the schedule was made for {want.sampler} ({cls.__name__}) but the pipeline uses "
                f"{type(sched).__name__}; set pipe.scheduler = {cls.__name__}.from_config(pipe.scheduler.config)"
            )
        timesteps = getattr(sched, "timesteps", None)
        n = 0 if timesteps is None else len(timesteps)
        if n != want.num_steps:
            raise FlexdiffError(
                f"the schedule has {want.num_steps} steps but the pipeline runs {n}: "
                f"call it with num_inference_steps={want.num_steps}"
            )
        if want.timesteps is not None and [int(t) for t in timesteps] != list(want.timesteps):
            raise FlexdiffError(
                f"the schedule runs its own timesteps {list(want.timesteps)} but the pipeline's scheduler has "
                f"{[int(t) for t in timesteps]}: call the pipeline with timesteps=list(schedule.timesteps)"
            )

    def reset(self) -> None:
        """Start a new sampling run: no step taken yet, cache emptied."""
        self.run = EngineRun()

    def locate(self, t) -> tuple[int, int]:
        """(schedule step, call slot) of a UNet call at timestep `t`; starts a new run where one begins."""
        run, n = self.run, self.schedule.num_steps
        timesteps = getattr(self.pipeline_scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) != n:
            if self.pipeline_scheduler is not None and run.index == -1:
                self.check_pipeline_scheduler()  # names the mismatch (a scheduler not set up for this schedule)
            return run.index + 1, 0  # counter mode: every call is the next step
        found = (torch.as_tensor(timesteps).float() == float(torch.as_tensor(t).reshape(-1)[0])).nonzero()
        if len(found) != 1:
            raise FlexdiffError(
                f"the UNet was called at timestep {float(torch.as_tensor(t).reshape(-1)[0]):g}, which is "
                f"{'not one' if not len(found) else 'more than one'} of the scheduler's {n} timesteps: flexdiff "
                "cannot tell which step of the schedule this call is")
        index = int(found[0])
        if index == run.index:
            return index, run.slot + 1  # another call of the same step
        if index < run.index:  # back to an earlier step without set_timesteps: a new run
            self.reset()
        return index, 0

    def attach(self) -> "StepEngine":
        if self.attached:
            return self
        if hasattr(self.unet, "_diffusers_hook") and self.unet._diffusers_hook.get_hook(HOOK_NAME):
            raise FlexdiffError("this UNet already has a flexdiff schedule applied; remove it first")
        key = 0
        for anat in self.anatomies:
            for group in (anat.units, anat.blocks):
                for unit in group:
                    for module in unit.modules:
                        HookRegistry.check_if_exists_or_initialize(module).register_hook(
                            _CacheHook(self, key, unit.depth), HOOK_NAME
                        )
                        self._hooked.append(module)
                        key += 1
        HookRegistry.check_if_exists_or_initialize(self.unet).register_hook(_StepHook(self), HOOK_NAME)
        self._hooked.append(self.unet)
        self._watch_set_timesteps()
        self.reset()
        return self

    def _watch_set_timesteps(self) -> None:
        """A pipeline call begins with `scheduler.set_timesteps`: wrap it (on this instance only) to start a run."""
        sched = self.pipeline_scheduler
        if sched is None or "set_timesteps" in vars(sched):
            return
        original = sched.set_timesteps

        def set_timesteps(*args, **kwargs):
            out = original(*args, **kwargs)
            self.reset()
            return out

        sched.set_timesteps = set_timesteps
        self._wrapped_scheduler = sched

    def detach(self) -> None:
        for module in self._hooked:
            module._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
        self._hooked.clear()
        sched = getattr(self, "_wrapped_scheduler", None)
        if sched is not None:
            del sched.set_timesteps  # the class's method shows through again
            self._wrapped_scheduler = None
        self.reset()

    def __enter__(self) -> "StepEngine":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def apply_schedule(model_or_pipeline: Any, schedule: Schedule) -> StepEngine:
    """Apply `schedule` to a diffusers UNet or to a pipeline's `.unet`; returns the attached engine.

    Call `engine.detach()` (or use the engine as a context manager) to restore the model. A
    pipeline must be called with `num_inference_steps=schedule.num_steps` and a scheduler of the
    schedule's kind; each UNet call is placed by its timestep (img2img, interrupted runs and
    two calls per step stay in step: see the module's docstring).
    """
    unet = getattr(model_or_pipeline, "unet", model_or_pipeline)
    return StepEngine(unet, schedule, getattr(model_or_pipeline, "scheduler", None)).attach()
