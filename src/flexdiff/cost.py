"""Cost of a schedule in multiply-accumulates (MACs), counted on the real model with torch's FLOP counter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .anatomy import anatomy
from .conditioning import embeds_guidance
from .devices import placement, synchronize, timing_tag, to_model
from .engine import StepEngine
from .mixture import expert_for_step, is_mixture
from .models import UNet
from .samplers import sampler_timesteps
from .schedule import FULL, Schedule, StepKind, partial

UNBATCHED = ("img_ids", "txt_ids")  # FLUX's position ids: one per token, shared by the batch


@dataclass(frozen=True)
class StepCosts:
    """MACs per image of one network call of each kind (null steps cost nothing)."""

    full: float
    partial: tuple[float, ...]  # index = branch
    guidance_factor: int = 1  # 2 when classifier-free guidance doubles the batch
    side: float = 0.0  # a ControlNet's MACs per call: it runs on full and partial steps, not on null steps

    def step_macs(self, kind: StepKind, branch: int | None = None) -> float:
        if kind is StepKind.FULL:
            return (self.full + self.side) * self.guidance_factor
        if kind is StepKind.PARTIAL:
            return (self.partial[branch] + self.side) * self.guidance_factor
        return 0.0

    def schedule_macs(self, schedule: Schedule) -> float:
        """MACs per image of a whole sampling run."""
        return sum(self.step_macs(s.kind, s.branch) for s in schedule.steps)

    def to_dict(self) -> dict:
        out = dict(full=self.full, partial=list(self.partial), guidance_factor=self.guidance_factor)
        return {**out, "side": self.side} if self.side else out


def _count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2  # one MAC = one multiply + one add


def _example_inputs(unet, cross_attention_len: int = 77) -> dict:
    """One image's keyword inputs (what the anatomy says a call takes), on the model's device and in its dtype."""
    device, dtype = placement(unet)
    kwargs = anatomy(unet).example_inputs(cross_attention_len)
    return {k: v.to(device) if k == "timestep" else to_model(v, device, dtype) for k, v in kwargs.items()}


def timing_machine(device: torch.device | None = None, dtype: torch.dtype | None = None) -> str:
    """The host, torch thread count, device and dtype a wall-clock measurement belongs to (timings compare
    only within one)."""
    import platform

    tag = timing_tag(device or torch.device("cpu"), dtype or torch.float32)
    return f"{platform.node() or 'host'}-{platform.machine()}-t{torch.get_num_threads()}-{tag}"


@torch.no_grad()
def measure_latency(unet, batch: int = 250, repeats: int = 5, cross_attention_len: int = 77) -> float:
    """Seconds per image of one forward at `batch` on the model's device and dtype (median of `repeats`,
    after a warm-up; the device is synchronized around every timed call)."""
    import time

    device = placement(unet)[0]
    kwargs = _example_inputs(unet, cross_attention_len)

    def widen(k, v):
        if isinstance(v, dict):
            return {a: widen(a, b) for a, b in v.items()}
        if k in UNBATCHED or not torch.is_tensor(v):
            return v
        return v.expand(batch, *v.shape[1:]).contiguous()

    kwargs = {k: widen(k, v) for k, v in kwargs.items()}
    unet(**kwargs)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        unet(**kwargs)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] / batch


@torch.no_grad()
def count_macs(unet) -> float:
    """MACs of one full forward of `unet` for one image."""
    kwargs = _example_inputs(unet)
    return _count(lambda: unet(**kwargs))


@dataclass(frozen=True)
class MixtureStepCosts:
    """Step costs of a mixture of experts: a step costs what its expert costs.

    A full step is made by the expert of its timestep; a partial step by the expert of the last
    full step (the engine's rule). The timesteps of a schedule come from its sampler.
    """

    experts: tuple[StepCosts, ...]
    intervals: Any  # the mixture's flexdiff.mixture.Intervals (its routing)
    scheduler_config: tuple  # sorted items, so the dataclass stays hashable

    @property
    def full(self) -> float:
        return max(c.full for c in self.experts)

    @property
    def partial(self) -> tuple[float, ...]:
        n = min(len(c.partial) for c in self.experts)
        return tuple(max(c.partial[b] for c in self.experts) for b in range(n))

    @property
    def guidance_factor(self) -> int:
        return self.experts[0].guidance_factor

    def schedule_macs(self, schedule: Schedule) -> float:
        total, expert = 0.0, 0
        for step, t in zip(schedule.steps, sampler_timesteps(schedule, dict(self.scheduler_config))):
            expert = expert_for_step(step.kind, t, expert, self.intervals)
            total += self.experts[expert].step_macs(step.kind, step.branch)
        return total

    def to_dict(self) -> dict:
        return dict(experts=[c.to_dict() for c in self.experts], starts=list(self.intervals.starts))


@torch.no_grad()
def measure_step_costs(unet: UNet, guidance: bool = False, cross_attention_len: int = 77, controlnet=None):
    """Count MACs of a full step and of a partial step at every branch, for one image.

    For a mixture of experts, per expert (a `MixtureStepCosts`). `controlnet`: a ControlNet the pipeline runs
    beside the denoiser (its conditioning image sized by its embedding's stride); its MACs are added to full and
    partial steps, which run it, and not to null steps, which skip it.
    """
    if is_mixture(unet):
        per = tuple(measure_step_costs(e, guidance, cross_attention_len) for e in unet.experts)
        # hashable, and still saying which process it is (a FlowMatch* class name marks flow matching)
        cfg = {k: v for k, v in unet.scheduler_config.items()
               if (k == "_class_name" or not k.startswith("_")) and not isinstance(v, list)}
        return MixtureStepCosts(per, unet.intervals, tuple(sorted(cfg.items())))
    kwargs = _example_inputs(unet, cross_attention_len)
    engine = StepEngine(unet, Schedule("ddim", (FULL,)))
    branches = engine.anatomy.num_branches
    engine.set_schedule(Schedule("ddim", (FULL,) + tuple(partial(b) for b in range(branches))))
    with engine:
        full = _count(lambda: unet(**kwargs))
        parts = tuple(_count(lambda: unet(**kwargs)) for _ in range(branches))
    side = 0.0 if controlnet is None else _controlnet_macs(controlnet, kwargs)
    doubled = guidance and not embeds_guidance(unet)  # FLUX.1-dev: guidance is an input, one call per step
    return StepCosts(full=full, partial=parts, guidance_factor=2 if doubled else 1, side=side)


def _controlnet_macs(controlnet, kwargs) -> float:
    """MACs of one ControlNet call for one image (a MultiControlNetModel: all of its nets)."""
    x, t = kwargs["sample"], kwargs["timestep"]
    nets = list(getattr(controlnet, "nets", None) or [controlnet])
    total = 0.0
    for net in nets:
        device, dtype = placement(net)
        scale = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)  # its image embedding's stride
        image = torch.zeros(1, net.config.conditioning_channels, x.shape[-2] * scale, x.shape[-1] * scale,
                            device=device, dtype=dtype)
        total += _count(lambda: net(x, t, encoder_hidden_states=kwargs["encoder_hidden_states"],
                                    controlnet_cond=image, return_dict=False))
    return total
