"""The step engine: run a `Schedule` of full / partial / null steps on an unmodified diffusers denoiser.

Where a partial step cuts is the anatomy's business (anatomy.py): a UNet recomputes its shallow skip units
and takes the deep ones from the last full step (DeepCache, Ma et al. CVPR 2024); a transformer runs its
first and last blocks and adds the middle's cached residual (transformer_anatomy.py). A null step makes no
network call and returns the last prediction. The engine installs the anatomy's hooks and decides, call by
call, which kind of step runs; it never branches on the model's class.

Everything is done with diffusers' removable `ModelHook`s on module instances: no forked
UNet code, no class patching. The per-run state (step index, cache) lives in `EngineRun`.

Which step a UNet call is (docs/engine.md): a run starts at `scheduler.set_timesteps` and a step
ends at `scheduler.step` (both wrapped on the instance, signatures kept); an eager call is placed
by its timestep's position in `scheduler.timesteps`, so late starts (img2img), interrupted runs
and several calls per step (numbered slots, each with its own cache) stay in step. A step whose
cache is empty runs full. Without a scheduler every call is the next step.

Under torch.compile the decision is made on the host: the `scheduler.step` wrapper plans the next
call (kind, branch, expert), and the compiled denoiser reads only that plan and its call slot: no
sync, no graph break, no recompile once each (kind, branch, slot) has been seen. State: runs.py.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .anatomy import UNetAnatomy, anatomy
from .errors import FlexdiffError
from .mixture import expert_for_step, experts_of, is_mixture
from .runs import EngineRun, place_timestep, scheduler_mismatch, watch_scheduler
from .schedule import Schedule, StepKind

HOOK_NAME = "flexdiff_step_engine"


class _StepHook(ModelHook):
    """On the UNet itself: decide which step of the schedule this call is, then run it."""

    def __init__(self, engine: "StepEngine"):
        super().__init__()
        self.engine = engine

    def new_forward(self, module, *args, **kwargs):
        eng = self.engine
        compiling = torch.compiler.is_compiling()
        eng.follow_scheduler()
        if compiling:  # the host planned this call (scheduler wrappers): read the plan, nothing of `t`
            run = eng.run
            if run.error is not None:
                raise FlexdiffError(run.error)
            slot = run.next_slot
            kind, branch = run.planned
            expert = run.planned_expert
        else:
            index, slot = eng.locate(eng.anatomy.timestep(args, kwargs))
            run = eng.run  # locate may have started a new run
            if run.index == -1 and eng.pipeline_scheduler is not None:
                eng.check_pipeline_scheduler()
            step = eng.schedule.steps[index]
            kind, branch = step.kind, (step.branch if step.branch is not None else 0)
            expert = None  # a full step's expert is read off its timestep below
            run.index = index
        if slot >= len(run.last_output):
            run.grow(slot)
        if kind is not StepKind.FULL and run.last_output[slot] is None:
            kind = StepKind.FULL  # nothing cached for this call yet (a late start, a new slot): compute it
        run.slot, run.mode, run.branch = slot, kind, branch
        run.next_slot = slot + 1
        if kind is StepKind.NULL:
            out = run.last_output[slot]  # no network call: reuse the last noise prediction
        elif eng.is_mixture:
            # a full step calls the expert of its timestep; a partial step calls the expert of the last
            # full step, whose deep features are the ones in the cache
            if kind is StepKind.FULL:
                if expert is None:  # eager, or a compiled run's first step: the timestep says
                    t = torch.as_tensor(eng.anatomy.timestep(args, kwargs)).reshape(-1)[0]
                    expert = expert_for_step(kind, t, run.expert, module.intervals)
                run.expert = expert
            out = self.fn_ref.original_forward(*args, expert=run.expert, **kwargs)
            run.last_output[slot] = out
        else:
            out = self.fn_ref.original_forward(*args, **kwargs)
            run.last_output[slot] = out
        if compiling:
            run.compiled_calls = True  # counted on the host at the step's end (a counter read here would recompile)
        else:
            eng._calls[kind.value] += 1
            if eng.pipeline_scheduler is None and run.index == eng.schedule.num_steps - 1:
                eng.reset()  # counter mode: the next call starts a new run; drop this run's features now
        return out


class _SideHook(ModelHook):
    """On a network the pipeline calls before the denoiser at every step (a ControlNet): skipped on the steps
    whose denoiser call will be a null step (its output would not be used), run otherwise. Partial steps run it
    in full: its residuals on the shallow skip connections steer the branch the partial step recomputes."""

    def __init__(self, engine: "StepEngine"):
        super().__init__()
        self.engine = engine
        self.last: dict[int, Any] = {}  # slot -> the output of its last run
        self.calls = 0  # how many times it actually ran

    def new_forward(self, module, *args, **kwargs):
        kind, slot = self.engine.peek(UNetAnatomy.timestep(args, kwargs))  # a ControlNet is called like a UNet
        if kind is StepKind.NULL and slot in self.last:
            return self.last[slot]
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.last[slot] = out
        self.calls += 1
        return out

    def reset(self) -> None:
        self.last.clear()


class StepEngine:
    """Applies a schedule to a UNet through removable hooks.

    >>> with StepEngine(unet, schedule) as engine:
    ...     images = pipeline(num_inference_steps=schedule.num_steps)  # or flexdiff.sampling.sample
    """

    def __init__(self, unet: torch.nn.Module, schedule: Schedule, pipeline_scheduler: Any = None,
                 pipeline: Any = None):
        # `unet`: a diffusers UNet or a flexdiff mixture of experts; a torch.compile'd one is hooked through the
        # module it compiles. `pipeline`: the object whose `.scheduler` runs the steps, read at every run (a
        # scheduler swapped after apply_schedule is followed); else the fixed `pipeline_scheduler`.
        self.unet = unet = getattr(unet, "_orig_mod", unet)
        self._pipeline = pipeline
        self._scheduler = pipeline_scheduler
        # a mixture of experts: every expert is hooked; a schedule must fit the one with the fewest branches
        self.anatomies = [anatomy(m) for m in experts_of(unet)]
        self.anatomy = min(self.anatomies, key=lambda a: a.num_branches)
        schedule.check_fits(self.anatomy.num_branches)
        self.schedule = schedule
        self.needed = self._needed(schedule)
        self._units = sum(a.cache_keys for a in self.anatomies)
        self.run = EngineRun(units=self._units)
        self._calls = {k.value: 0 for k in StepKind}  # UNet calls seen, by the kind of step they were
        self._hooked: list[torch.nn.Module] = []
        self._wrapped_scheduler = None
        self._side: _SideHook | None = None

    @property
    def pipeline_scheduler(self) -> Any:
        if self._pipeline is not None:
            return getattr(self._pipeline, "scheduler", None)
        return self._scheduler

    @property
    def calls(self) -> dict[str, int]:
        """UNet calls so far, by the kind of step they were (a copy)."""
        self._flush()
        return dict(self._calls)

    @property
    def is_mixture(self) -> bool:
        return is_mixture(self.unet)

    @property
    def attached(self) -> bool:
        return bool(self._hooked)

    def set_schedule(self, schedule: Schedule) -> None:
        schedule.check_fits(self.anatomy.num_branches)
        self.schedule, self.needed = schedule, self._needed(schedule)
        self.reset()

    def _needed(self, schedule: Schedule) -> frozenset:
        """The block boundaries a transformer's full steps record: those the schedule's partial steps cut at, in
        every expert of a mixture (experts of other depths cut the same branch at other blocks)."""
        return frozenset(k for a in self.anatomies if hasattr(a, "boundaries")
                         for s in schedule.steps if s.kind is StepKind.PARTIAL for k in a.boundaries(s.branch))

    def scheduler_mismatch(self) -> str | None:
        """Why the pipeline's scheduler does not fit the schedule (kind, step count, timesteps); None if it does."""
        return scheduler_mismatch(self.pipeline_scheduler, self.schedule)

    def check_pipeline_scheduler(self) -> None:
        """Refuse a pipeline whose scheduler does not fit the schedule (kind and step count)."""
        why = self.scheduler_mismatch()
        if why:
            raise FlexdiffError(why)

    def reset(self) -> None:
        """Start a new sampling run: no step taken yet, cache emptied."""
        self._flush()
        self.run = EngineRun(units=self._units)
        if self._side is not None:
            self._side.reset()

    @property
    def side_calls(self) -> int:
        """Calls of the pipeline's ControlNet that ran (it is skipped on null steps); 0 without one."""
        return 0 if self._side is None else self._side.calls

    def peek(self, t) -> tuple[StepKind, int]:
        """(kind, slot) the next denoiser call at timestep `t` will have, without taking the step."""
        self.follow_scheduler()
        run = self.run
        if torch.compiler.is_compiling():
            kind, slot = run.planned[0], run.next_slot
        else:
            timesteps = getattr(self.pipeline_scheduler, "timesteps", None)
            if timesteps is None or len(timesteps) != self.schedule.num_steps:
                return StepKind.FULL, 0
            index = place_timestep(t, timesteps, "ControlNet was called")
            slot = run.slot + 1 if index == run.index else 0
            kind = self.schedule.steps[index].kind if index >= run.index else StepKind.FULL
        if slot >= len(run.last_output) or run.last_output[slot] is None:
            kind = StepKind.FULL  # the denoiser will run full: so must its ControlNet
        return kind, slot

    def _flush(self) -> None:
        """Count the compiled calls of the planned step: the plan's kind, or full where a slot had nothing cached."""
        run = self.run
        if run.compiled_calls:
            for slot in range(run.next_slot):
                kind = run.planned[0] if slot < len(run.cached_slots) and run.cached_slots[slot] else StepKind.FULL
                self._calls[kind.value] += 1
            run.compiled_calls = False

    def locate(self, t) -> tuple[int, int]:
        """(schedule step, call slot) of a UNet call at timestep `t`; starts a new run where one begins."""
        run, n = self.run, self.schedule.num_steps
        timesteps = getattr(self.pipeline_scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) != n:
            if self.pipeline_scheduler is not None and run.index == -1:
                self.check_pipeline_scheduler()  # names the mismatch (a scheduler not set up for this schedule)
            return run.index + 1, 0  # counter mode: every call is the next step
        index = place_timestep(t, timesteps, "UNet was called")
        if index == run.index:
            return index, run.slot + 1  # another call of the same step
        if index < run.index:  # back to an earlier step without set_timesteps: a new run
            self.reset()
        return index, 0

    def _plan(self, position: int | None) -> None:
        """Host side: what the next call is (kind, branch, expert), for a compiled denoiser to read."""
        run = self.run
        run.position, run.next_slot, run.cached_slots = position, 0, tuple(o is not None for o in run.last_output)
        if position is None or position >= self.schedule.num_steps:
            run.planned, run.planned_expert = (StepKind.FULL, 0), None  # a run's first step: nothing cached
            return
        step = self.schedule.steps[position]
        run.planned = (step.kind, step.branch if step.branch is not None else 0)
        run.planned_expert = None
        if self.is_mixture and step.kind is StepKind.FULL:
            timesteps = self.pipeline_scheduler.timesteps
            run.planned_expert = expert_for_step(step.kind, float(timesteps[position]), run.expert, self.unet.intervals)

    def attach(self) -> "StepEngine":
        if self.attached:
            return self
        if hasattr(self.unet, "_diffusers_hook") and self.unet._diffusers_hook.get_hook(HOOK_NAME):
            raise FlexdiffError("this UNet already has a flexdiff schedule applied; remove it first")
        key = 0
        for anat in self.anatomies:
            for module, hook in anat.hooks(self, key):
                HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
                self._hooked.append(module)
            key += anat.cache_keys
        HookRegistry.check_if_exists_or_initialize(self.unet).register_hook(_StepHook(self), HOOK_NAME)
        self._hooked.append(self.unet)
        side = getattr(self._pipeline, "controlnet", None)
        if isinstance(side, torch.nn.Module):  # ControlNetModel, or a MultiControlNetModel of several
            self._side = _SideHook(self)
            HookRegistry.check_if_exists_or_initialize(side).register_hook(self._side, HOOK_NAME)
            self._hooked.append(side)
        self.follow_scheduler()
        self.reset()
        return self

    def follow_scheduler(self) -> None:
        """Watch the pipeline's current scheduler (one swapped in after `apply_schedule` takes over from the old)."""
        sched = self.pipeline_scheduler
        if sched is self._wrapped_scheduler:
            return
        self._unwrap()
        if sched is None or "set_timesteps" in vars(sched) or "step" in vars(sched):
            return
        self._wrap(sched)
        self.reset()
        if getattr(sched, "timesteps", None) is not None:  # set up before we watched it: this run starts now
            self.run.error = self.scheduler_mismatch()

    def _wrap(self, sched) -> None:
        """Start a run at `set_timesteps`; at each `scheduler.step`, place the step just taken and plan the next
        call on the host (what a compiled denoiser reads)."""

        def started() -> None:
            self.reset()
            self.run.error = self.scheduler_mismatch()

        def stepping(timestep) -> None:
            run, timesteps = self.run, sched.timesteps
            placed = run.next_slot > 0 and not run.compiled_calls  # eager calls of this step placed it already
            self._flush()
            if timesteps is not None and len(timesteps) == self.schedule.num_steps and run.error is None:
                if not placed:
                    run.index = place_timestep(timestep, timesteps, "scheduler stepped")
                self._plan(run.index + 1)

        self._unwatch = watch_scheduler(sched, started, stepping)
        self._wrapped_scheduler = sched

    def _unwrap(self) -> None:
        if self._wrapped_scheduler is not None:
            self._unwatch()
            self._wrapped_scheduler = None

    def detach(self) -> None:
        for module in self._hooked:
            module._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
        self._hooked.clear()
        self._unwrap()
        self.reset()

    def __enter__(self) -> "StepEngine":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def apply_schedule(model_or_pipeline: Any, schedule: Schedule) -> StepEngine:
    """Apply `schedule` to a diffusers denoiser (UNet or transformer) or to a pipeline's `.unet` / `.transformer`;
    returns the attached engine.

    Call `engine.detach()` (or use the engine as a context manager) to restore the model. A
    pipeline must be called with the schedule's steps (`**schedule.pipeline_kwargs()`) and a scheduler of the
    schedule's kind; a scheduler swapped in after this call is followed. Each denoiser call is placed by its
    timestep (img2img, interrupted runs and two calls per step stay in step: see the module's
    docstring), and the plan of each next call is made on the host, so a compiled denoiser runs it.
    """
    denoiser = getattr(model_or_pipeline, "unet", None)
    if denoiser is None:
        denoiser = getattr(model_or_pipeline, "transformer", None)
    if denoiser is None:
        return StepEngine(model_or_pipeline, schedule).attach()
    return StepEngine(denoiser, schedule, pipeline=model_or_pipeline).attach()
