"""The step engine: run a `Schedule` of full / partial / null steps on an unmodified diffusers UNet.

Mechanism (DeepCache, Ma et al. CVPR 2024): the UNet's down path produces skip tensors
s_0 (conv_in) ... s_{K-1}; the up path consumes them in reverse. A partial step at branch `b`
recomputes only the units that produce s_0..s_b and the up units that consume them; every
deeper unit (and the mid block) returns the output it produced at the last full step. A null
step makes no network call and returns the last noise prediction.

Everything is done with diffusers' removable `ModelHook`s on module instances: no forked
UNet code, no class patching. The per-run state (step counter, cache) lives in `EngineRun`,
and the step index comes from that explicit counter, never from looking the timestep up.
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

    step: int = 0
    mode: StepKind = StepKind.FULL
    branch: int = 0
    cache: dict[int, Any] = field(default_factory=dict)
    last_output: Any = None
    expert: int = 0  # with a mixture: the expert of the last full step


class _CacheHook(ModelHook):
    """On a unit or block: record its output at full steps, return that record when a partial step skips it."""

    def __init__(self, engine: "StepEngine", key: int, depth: int):
        super().__init__()
        self.engine, self.key, self.depth = engine, key, depth

    def new_forward(self, module, *args, **kwargs):
        run = self.engine.run
        if run.mode is StepKind.PARTIAL and self.depth > run.branch:
            return run.cache[self.key]
        out = self.fn_ref.original_forward(*args, **kwargs)
        if run.mode is StepKind.FULL:
            run.cache[self.key] = out
        return out


class _StepHook(ModelHook):
    """On the UNet itself: take the next step of the schedule from the run's counter."""

    def __init__(self, engine: "StepEngine"):
        super().__init__()
        self.engine = engine

    def new_forward(self, module, *args, **kwargs):
        eng, run = self.engine, self.engine.run
        if run.step == 0 and eng.pipeline_scheduler is not None:
            eng.check_pipeline_scheduler()
        step = eng.schedule.steps[run.step]
        run.mode = step.kind
        run.branch = step.branch if step.branch is not None else 0
        if step.kind is StepKind.NULL:
            out = run.last_output  # no network call: reuse the last noise prediction
        elif eng.is_mixture:
            # a full step calls the expert of its timestep; a partial step calls the expert of the last
            # full step, whose deep features are the ones in the cache
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            run.expert = expert_for_step(step.kind, torch.as_tensor(t).reshape(-1)[0], run.expert, module.intervals)
            out = self.fn_ref.original_forward(*args, expert=run.expert, **kwargs)
            run.last_output = out
        else:
            out = self.fn_ref.original_forward(*args, **kwargs)
            run.last_output = out
        eng.calls[step.kind.value] += 1
        run.step = (run.step + 1) % eng.schedule.num_steps  # a new sampling run starts after the last step
        if run.step == 0:
            eng.run = EngineRun()  # drop the cache: the next run must not see this run's features
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

    def reset(self) -> None:
        """Start a new sampling run: step counter to 0, cache emptied."""
        self.run = EngineRun()

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
        self.reset()
        return self

    def detach(self) -> None:
        for module in self._hooked:
            module._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
        self._hooked.clear()
        self.reset()

    def __enter__(self) -> "StepEngine":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def apply_schedule(model_or_pipeline: Any, schedule: Schedule) -> StepEngine:
    """Apply `schedule` to a diffusers UNet or to a pipeline's `.unet`; returns the attached engine.

    Call `engine.detach()` (or use the engine as a context manager) to restore the model. A
    pipeline must be called with `num_inference_steps=schedule.num_steps` and a scheduler of the
    schedule's kind; each UNet call advances the step counter by one.
    """
    unet = getattr(model_or_pipeline, "unet", model_or_pipeline)
    return StepEngine(unet, schedule, getattr(model_or_pipeline, "scheduler", None)).attach()
