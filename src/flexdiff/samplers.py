"""What a sampler is, in one place: names, diffusers scheduler classes and options, timesteps.

A schedule names its sampler (`Schedule.sampler`); everything that turns that name into a
diffusers scheduler, or into the timesteps the sampler will visit, lives here. Also the noise
schedule a model was trained with (its scheduler config): the default's, and the checks on a
user's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from .errors import FlexdiffError


class StepPlan(Protocol):
    """What this module reads of a schedule (schedule.py imports from here, never the other way round)."""

    sampler: str
    name: str

    @property
    def num_steps(self) -> int: ...

    @property
    def timesteps(self) -> tuple[int, ...] | None: ...

SAMPLERS = ("ddim", "dpmsolver++", "euler", "unipc", "flow-euler", "flow-dpmsolver++", "flow-unipc")
# the samplers of a flow-matching model (a FlowMatch* scheduler config: SD3, FLUX, the default transformer)
FLOW_SAMPLERS = ("flow-euler", "flow-dpmsolver++", "flow-unipc")

# samplers whose diffusers scheduler takes a list of timesteps (`set_timesteps(timesteps=...)`)
EXPLICIT_TIMESTEPS = ("dpmsolver++", "euler", "flow-euler")

# The diffusers scheduler class behind each sampler name, and the settings flexdiff gives it on
# top of the model's scheduler config.
SCHEDULER_CLASSES = {
    "ddim": DDIMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,  # UniPC (Zhao et al. 2023): a stronger few-step peer
    "flow-euler": FlowMatchEulerDiscreteScheduler,  # SD3's and FLUX's own sampler
    "flow-dpmsolver++": DPMSolverMultistepScheduler,  # in diffusers' flow mode (flow sigmas, velocity)
    "flow-unipc": UniPCMultistepScheduler,
}
SCHEDULER_OPTIONS = {
    "ddim": dict(timestep_spacing="trailing", clip_sample=False),
    "dpmsolver++": dict(algorithm_type="dpmsolver++", solver_order=2),
    "euler": {},
    "unipc": dict(solver_order=2, predict_x0=True, solver_type="bh2"),
    "flow-euler": {},
    "flow-dpmsolver++": dict(algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
                             prediction_type="flow_prediction"),
    "flow-unipc": dict(solver_order=2, predict_x0=True, solver_type="bh2", use_flow_sigmas=True,
                       prediction_type="flow_prediction"),
}

# The noise schedule the default model is trained with (DDPM, linear betas, 1,000 steps).
DEFAULT_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
)
# The noise schedule of the default transformer: flow matching (x_t = (1 - t) x_0 + t eps, velocity target),
# sampled by FlowMatchEulerDiscreteScheduler with no shift (16x16 images need none).
FLOW_SCHEDULER_CONFIG = dict(
    _class_name="FlowMatchEulerDiscreteScheduler",
    num_train_timesteps=1000,
    shift=1.0,
)


def is_flow(scheduler_config: dict) -> bool:
    """Whether a model was trained with flow matching (a FlowMatch* scheduler config, or one in flow mode)."""
    return (str(scheduler_config.get("_class_name", "")).startswith("FlowMatch")
            or bool(scheduler_config.get("use_flow_sigmas")) or scheduler_config.get("prediction_type") == "flow_prediction")


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_sampler(name: str, option: str = "--sampler") -> str:
    if name not in SAMPLERS:
        raise FlexdiffError(f"{option} {name!r}: accepted values are {', '.join(SAMPLERS)}")
    return name


def samplers_for(scheduler_config: dict) -> tuple[str, ...]:
    """The samplers a model trained with `scheduler_config` can use: flow samplers for a flow model, else the rest."""
    return FLOW_SAMPLERS if is_flow(scheduler_config) else tuple(s for s in SAMPLERS if s not in FLOW_SAMPLERS)


def default_sampler(scheduler_config: dict) -> str:
    """The sampler the model's own pipeline uses by default: flow Euler on a flow model, DDIM otherwise."""
    return "flow-euler" if is_flow(scheduler_config) else "ddim"


def check_sampler_fits(sampler: str, scheduler_config: dict, option: str = "--sampler") -> str:
    """Refuse a sampler that does not fit the model's training (DDIM on a flow model, flow Euler on a DDPM one)."""
    check_sampler(sampler, option)
    fits = samplers_for(scheduler_config)
    if sampler not in fits:
        kind = "a flow-matching model" if is_flow(scheduler_config) else "a DDPM-trained (noise-prediction) model"
        raise FlexdiffError(f"{option} {sampler}: this is {kind}; its samplers are {', '.join(fits)}")
    return sampler


def make_scheduler(sampler: str, scheduler_config: dict):
    """A fresh diffusers scheduler of kind `sampler` for a model trained with `scheduler_config`.

    DDIM uses "trailing" timestep spacing, so that few-step runs start at the last training
    timestep (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
    """
    check_sampler_fits(sampler, scheduler_config, "sampler")
    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    options = dict(SCHEDULER_OPTIONS[sampler])
    if sampler in ("flow-dpmsolver++", "flow-unipc"):
        options["flow_shift"] = float(cfg.pop("shift", 1.0))  # the flow model's own time shift
    return SCHEDULER_CLASSES[sampler].from_config(cfg, **options)


def flux_shift(image_tokens: int, config) -> float:
    """FLUX's resolution-dependent time shift mu: linear in the image's token count, from base_shift at
    base_image_seq_len to max_shift at max_image_seq_len (as FluxPipeline computes it)."""
    base_n, max_n = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return base + (top - base) * (image_tokens - base_n) / (max_n - base_n)


def set_timesteps(scheduler, schedule: StepPlan, image_tokens: int | None = None) -> None:
    """Give `scheduler` the schedule's steps: its own spacing, or the schedule's explicit timesteps.

    A scheduler with dynamic shifting (FLUX) needs the image's token count: its sigmas are FluxPipeline's,
    linspace(1, 1/n, n), shifted by `flux_shift` of that count."""
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        if image_tokens is None:
            raise FlexdiffError(f"{type(scheduler).__name__} with use_dynamic_shifting (FLUX) needs the image's token "
                                "count to place its timesteps")
        if schedule.timesteps is not None:
            raise FlexdiffError(f"schedule {schedule.name}: explicit timesteps on a dynamically shifted (FLUX) "
                                "scheduler are not supported; use the sampler's own spacing")
        n = schedule.num_steps
        sigmas = [1.0 - i * (1.0 - 1.0 / n) / max(1, n - 1) for i in range(n)]
        scheduler.set_timesteps(sigmas=sigmas, mu=flux_shift(image_tokens, scheduler.config))
        return
    if schedule.timesteps is None:
        scheduler.set_timesteps(schedule.num_steps)
    else:
        scheduler.set_timesteps(timesteps=list(schedule.timesteps))


_TIMESTEPS: dict = {}


def sampler_timesteps(schedule: StepPlan, scheduler_config: dict) -> list[float]:
    """The timesteps the schedule's sampler visits, one per step (cached: cost counting asks often)."""
    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_") and not isinstance(v, list)}
    key = (schedule.sampler, schedule.num_steps, schedule.timesteps, tuple(sorted(cfg.items())))
    if key not in _TIMESTEPS:
        sched = make_scheduler(schedule.sampler, scheduler_config)
        set_timesteps(sched, schedule)
        _TIMESTEPS[key] = [float(t) for t in sched.timesteps]
    return _TIMESTEPS[key]


def num_train_timesteps(scheduler_config: dict) -> int:
    return int(scheduler_config.get("num_train_timesteps", 1000))


def check_scheduler_config(config: dict, where: Path | str) -> dict:
    """The noise-schedule fields flexdiff's samplers read, checked here so a bad value names its file."""
    def bad(field, why):
        return FlexdiffError(f"{where}: {field} is {config[field]!r}; {why}")

    T = config.get("num_train_timesteps", 1000)
    if "num_train_timesteps" in config and (isinstance(T, bool) or not isinstance(T, int) or T < 2):
        raise bad("num_train_timesteps", "expected a whole number >= 2")
    for f in ("beta_start", "beta_end"):
        v = config.get(f)
        if f in config and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1):
            raise bad(f, "expected a number between 0 and 1")
    if "beta_start" in config and "beta_end" in config and config["beta_start"] > config["beta_end"]:
        raise bad("beta_start", f"it must not exceed beta_end ({config['beta_end']!r})")
    if "beta_schedule" in config and config["beta_schedule"] not in BETA_SCHEDULES:
        raise bad("beta_schedule", f"accepted values are {', '.join(BETA_SCHEDULES)}")
    if "prediction_type" in config and config["prediction_type"] not in PREDICTION_TYPES:
        raise bad("prediction_type", f"accepted values are {', '.join(PREDICTION_TYPES)}")
    return config
