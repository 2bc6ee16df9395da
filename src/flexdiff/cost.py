"""Cost of a schedule in multiply-accumulates (MACs), counted on the real model with torch's FLOP counter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .engine import StepEngine
from .models import UNet, UNet2DConditionModel
from .schedule import FULL, Schedule, StepKind, partial


@dataclass(frozen=True)
class StepCosts:
    """MACs per image of one network call of each kind (null steps cost nothing)."""

    full: float
    partial: tuple[float, ...]  # index = branch
    guidance_factor: int = 1  # 2 when classifier-free guidance doubles the batch

    def step_macs(self, kind: StepKind, branch: int | None = None) -> float:
        if kind is StepKind.FULL:
            return self.full * self.guidance_factor
        if kind is StepKind.PARTIAL:
            return self.partial[branch] * self.guidance_factor
        return 0.0

    def schedule_macs(self, schedule: Schedule) -> float:
        """MACs per image of a whole sampling run."""
        return sum(self.step_macs(s.kind, s.branch) for s in schedule.steps)

    def to_dict(self) -> dict:
        return dict(full=self.full, partial=list(self.partial), guidance_factor=self.guidance_factor)


def _count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2  # one MAC = one multiply + one add


@torch.no_grad()
def measure_step_costs(unet: UNet, guidance: bool = False, cross_attention_len: int = 77) -> StepCosts:
    """Count MACs of a full step and of a partial step at every branch, for one image."""
    cfg = unet.config
    x = torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.tensor([500])
    kwargs = {}
    if isinstance(unet, UNet2DConditionModel):
        kwargs["encoder_hidden_states"] = torch.zeros(1, cross_attention_len, cfg.cross_attention_dim)
    engine = StepEngine(unet, Schedule("ddim", (FULL,)))
    branches = engine.anatomy.num_branches
    engine.set_schedule(Schedule("ddim", (FULL,) + tuple(partial(b) for b in range(branches))))
    with engine:
        full = _count(lambda: unet(x, t, **kwargs))
        parts = tuple(_count(lambda: unet(x, t, **kwargs)) for _ in range(branches))
    return StepCosts(full=full, partial=parts, guidance_factor=2 if guidance else 1)
