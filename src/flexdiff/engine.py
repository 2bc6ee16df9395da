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

from .errors import FlexdiffError
from .schedule import Schedule, StepKind

HOOK_NAME = "flexdiff_step_engine"


@dataclass
class Unit:
    """A group of modules that is skipped or run together; `depth` = index of the skip tensor it touches."""

    name: str
    modules: list[torch.nn.Module]
    depth: int


@dataclass
class UNetAnatomy:
    """Where partial steps may cut a UNet: its units, its blocks, and the number of branches."""

    units: list[Unit]
    blocks: list[Unit]  # whole blocks, with depth = the shallowest depth inside them
    num_branches: int


def _block_units(prefix: str, block: torch.nn.Module, depth: int, step: int) -> tuple[list[Unit], int]:
    """Split a diffusers down/up block into units: (resnet [+attention] [+upsampler]) per skip tensor."""
    resnets = list(block.resnets)
    attentions = list(getattr(block, "attentions", None) or [])
    units = []
    for k, resnet in enumerate(resnets):
        mods = [resnet] + ([attentions[k]] if k < len(attentions) else [])
        if step < 0 and k == len(resnets) - 1 and getattr(block, "upsamplers", None):
            mods += list(block.upsamplers)  # feeds the next up block: cached with this resnet
        units.append(Unit(f"{prefix}.resnets.{k}", mods, depth))
        depth += step
    if step > 0 and getattr(block, "downsamplers", None):
        units.append(Unit(f"{prefix}.downsamplers", list(block.downsamplers), depth))
        depth += step
    return units, depth


def anatomy(unet: torch.nn.Module) -> UNetAnatomy:
    """Find the cache units of a diffusers UNet2DModel / UNet2DConditionModel."""
    for name in ("conv_in", "down_blocks", "up_blocks"):
        if not hasattr(unet, name):
            raise FlexdiffError(f"{type(unet).__name__} is not a diffusers UNet (no {name})")
    if any(hasattr(b, "skip_conv") for b in list(unet.down_blocks) + list(unet.up_blocks)):
        raise FlexdiffError("UNets with skip-sample blocks (AttnSkipDownBlock2D ...) are not supported")
    units, blocks = [], []
    depth = 1  # s_0 is conv_in's output, always computed
    for j, block in enumerate(unet.down_blocks):
        first = depth
        bu, depth = _block_units(f"down_blocks.{j}", block, depth, +1)
        units += bu
        blocks.append(Unit(f"down_blocks.{j}", [block], first))
    num_branches = depth
    up_consumed = sum(len(b.resnets) for b in unet.up_blocks)
    if up_consumed != num_branches:
        raise FlexdiffError(
            f"unsupported UNet layout: the down path makes {num_branches} skip tensors, "
            f"the up path consumes {up_consumed}"
        )
    if getattr(unet, "mid_block", None) is not None:
        # the mid block is one unit, hooked once (as a block): every partial step skips it
        blocks.append(Unit("mid_block", [unet.mid_block], num_branches))
    depth = num_branches - 1
    for j, block in enumerate(unet.up_blocks):
        bu, depth = _block_units(f"up_blocks.{j}", block, depth, -1)
        units += bu
        blocks.append(Unit(f"up_blocks.{j}", [block], min(u.depth for u in bu)))
    return UNetAnatomy(units=units, blocks=blocks, num_branches=num_branches)


def is_mixture(model: torch.nn.Module) -> bool:
    """A mixture of experts (flexdiff.experts.Mixture): experts plus a timestep router."""
    return hasattr(model, "experts") and hasattr(model, "route")


def _experts(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNets behind `unet`: itself, or every expert of a mixture."""
    return list(unet.experts) if is_mixture(unet) else [unet]


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
            if step.kind is StepKind.FULL:
                t = args[1] if len(args) > 1 else kwargs["timestep"]
                run.expert = int(module.route(t)[0])
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
        self.anatomies = [anatomy(m) for m in _experts(unet)]
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
        from .sampling import SCHEDULER_CLASSES  # imported here: sampling imports this module

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


def num_branches(unet: torch.nn.Module) -> int:
    """Cache branches a schedule may use on `unet` (on a mixture: those every expert has)."""
    return min(anatomy(m).num_branches for m in _experts(unet))
