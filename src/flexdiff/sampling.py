"""Sampling loops over diffusers schedulers, with a schedule applied by the step engine."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from .engine import StepEngine, is_mixture
from .errors import FlexdiffError
from .models import UNet, UNet2DConditionModel
from .schedule import SAMPLERS, Schedule

logging.getLogger("diffusers").setLevel(logging.ERROR)


# The diffusers scheduler class behind each sampler name of a Schedule, and the settings flexdiff
# gives it on top of the model's scheduler config.
SCHEDULER_CLASSES = {
    "ddim": DDIMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
SCHEDULER_OPTIONS = {
    "ddim": dict(timestep_spacing="trailing", clip_sample=False),
    "dpmsolver++": dict(algorithm_type="dpmsolver++", solver_order=2),
    "euler": {},
}


def make_scheduler(sampler: str, scheduler_config: dict):
    """A fresh diffusers scheduler of kind `sampler` for a model trained with `scheduler_config`.

    DDIM uses "trailing" timestep spacing, so that few-step runs start at the last training
    timestep (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
    """
    if sampler not in SCHEDULER_CLASSES:
        raise FlexdiffError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return SCHEDULER_CLASSES[sampler].from_config(cfg, **SCHEDULER_OPTIONS[sampler])


def set_timesteps(scheduler, schedule: Schedule) -> None:
    if schedule.timesteps is None:
        scheduler.set_timesteps(schedule.num_steps)
    else:
        scheduler.set_timesteps(timesteps=list(schedule.timesteps))


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The shared starting noise: the same seed gives every method the same x_T."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g)


@dataclass
class Conditioning:
    """Text (or other) conditioning for a UNet2DConditionModel, with classifier-free guidance."""

    encoder_hidden_states: torch.Tensor  # (1 or N, seq, dim)
    negative: torch.Tensor | None = None  # unconditional embedding; zeros if None
    guidance_scale: float = 1.0

    def batched(self, n: int) -> tuple[torch.Tensor, bool]:
        cond = self.encoder_hidden_states.expand(n, *self.encoder_hidden_states.shape[1:]) \
            if self.encoder_hidden_states.shape[0] == 1 else self.encoder_hidden_states
        if self.guidance_scale == 1.0:
            return cond, False
        neg = torch.zeros_like(cond) if self.negative is None else self.negative.expand_as(cond)
        return torch.cat([neg, cond]), True


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W), model space ([-1, 1] for the default)
    seconds: float
    calls: dict[str, int]  # UNet calls per step kind, as the engine saw them (summed over batches)


@torch.no_grad()
def _sample_batch(unet: UNet, scheduler, engine: StepEngine, x: torch.Tensor,
                  cond: Conditioning | None) -> torch.Tensor:
    engine.reset()
    x = x * scheduler.init_noise_sigma
    ehs, guided = cond.batched(x.shape[0]) if cond is not None else (None, False)
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        model_in = scheduler.scale_model_input(model_in, t)
        if ehs is None:
            eps = unet(model_in, t).sample  # full, partial or null: the engine decides
        else:
            eps = unet(model_in, t, encoder_hidden_states=ehs).sample
        if guided:  # classifier-free guidance (Ho & Salimans 2022): eps_u + w (eps_c - eps_u)
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + cond.guidance_scale * (eps_c - eps_u)
        x = scheduler.step(eps, t, x).prev_sample  # the sampler's update x_t -> x_{t-1}
    return x


def sample(
    unet: UNet,
    scheduler_config: dict,
    schedule: Schedule,
    noise: torch.Tensor,
    batch_size: int = 250,
    cond: Conditioning | None = None,
    progress=None,
    description: str | None = None,
) -> SampleResult:
    """Draw one sample per row of `noise`, running `schedule` on `unet`.

    The hooks are attached for the call and removed afterwards, so `unet` is unchanged.
    """
    first = unet.experts[0] if is_mixture(unet) else unet  # a mixture: its experts' class
    if isinstance(first, UNet2DConditionModel) and cond is None:
        raise FlexdiffError("this is a conditional UNet: pass conditioning (encoder_hidden_states)")
    scheduler = make_scheduler(schedule.sampler, scheduler_config)
    set_timesteps(scheduler, schedule)
    if len(scheduler.timesteps) != schedule.num_steps:
        raise FlexdiffError(
            f"{schedule.sampler} made {len(scheduler.timesteps)} timesteps for a {schedule.num_steps}-step schedule"
        )
    outs = []
    task = progress.add_task(description or schedule.name, total=len(noise)) if progress else None
    t0 = time.perf_counter()
    with StepEngine(unet, schedule) as engine:
        for start in range(0, len(noise), batch_size):
            chunk = noise[start:start + batch_size]
            set_timesteps(scheduler, schedule)  # also resets the multistep solver's history
            outs.append(_sample_batch(unet, scheduler, engine, chunk, cond))
            if task is not None:
                progress.update(task, advance=len(chunk))
        calls = dict(engine.calls)
    seconds = time.perf_counter() - t0
    if task is not None:
        progress.remove_task(task)
    return SampleResult(images=torch.cat(outs), seconds=seconds, calls=calls)
