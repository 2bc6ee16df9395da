"""What a sampler is, in one place: names, diffusers scheduler classes and options, timesteps.

A schedule names its sampler (`Schedule.sampler`); everything that turns that name into a
diffusers scheduler, or into the timesteps the sampler will visit, lives here. Also the noise
schedule a model was trained with (its scheduler config): the default's, and the checks on a
user's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from .errors import FlexdiffError

if TYPE_CHECKING:  # schedule.py imports SAMPLERS from here
    from .schedule import Schedule

SAMPLERS = ("ddim", "dpmsolver++", "euler", "unipc")

# The diffusers scheduler class behind each sampler name, and the settings flexdiff gives it on
# top of the model's scheduler config.
SCHEDULER_CLASSES = {
    "ddim": DDIMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,  # UniPC (Zhao et al. 2023): a stronger few-step peer
}
SCHEDULER_OPTIONS = {
    "ddim": dict(timestep_spacing="trailing", clip_sample=False),
    "dpmsolver++": dict(algorithm_type="dpmsolver++", solver_order=2),
    "euler": {},
    "unipc": dict(solver_order=2, predict_x0=True, solver_type="bh2"),
}

# The noise schedule the default model is trained with (DDPM, linear betas, 1,000 steps).
DEFAULT_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_sampler(name: str, option: str = "--sampler") -> str:
    if name not in SAMPLERS:
        raise FlexdiffError(f"{option} {name!r}: accepted values are {', '.join(SAMPLERS)}")
    return name


def make_scheduler(sampler: str, scheduler_config: dict):
    """A fresh diffusers scheduler of kind `sampler` for a model trained with `scheduler_config`.

    DDIM uses "trailing" timestep spacing, so that few-step runs start at the last training
    timestep (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
    """
    check_sampler(sampler, "sampler")
    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return SCHEDULER_CLASSES[sampler].from_config(cfg, **SCHEDULER_OPTIONS[sampler])


def set_timesteps(scheduler, schedule: "Schedule") -> None:
    """Give `scheduler` the schedule's steps: its own spacing, or the schedule's explicit timesteps."""
    if schedule.timesteps is None:
        scheduler.set_timesteps(schedule.num_steps)
    else:
        scheduler.set_timesteps(timesteps=list(schedule.timesteps))


_TIMESTEPS: dict = {}


def sampler_timesteps(schedule: "Schedule", scheduler_config: dict) -> list[float]:
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
