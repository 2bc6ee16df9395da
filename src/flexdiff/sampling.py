"""Sampling loops over diffusers schedulers, with a schedule applied by the step engine."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .anatomy import call_anatomy, num_branches
from .conditioning import Conditioning, class_spec, takes_text
from .devices import placement, to_model
from .engine import StepEngine
from .errors import FlexdiffError
from .mixture import is_mixture
from .models import UNet
from .prefixes import PrefixCache, restore_scheduler
from .samplers import make_scheduler, num_train_timesteps, set_timesteps
from .schedule import Schedule

logging.getLogger("diffusers").setLevel(logging.ERROR)


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The shared starting noise: the same seed gives every method the same x_T."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g)


def null_conditioning(unet) -> Conditioning | None:
    """Unconditional sampling of a class-conditional model: every row gets the null label."""
    spec = class_spec(unet.experts[0] if is_mixture(unet) else unet)
    if spec is None:
        return None
    return Conditioning(class_labels=torch.tensor([spec.null]), null_label=spec.null, tokens=spec.tokens)


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W), model space ([-1, 1] for the default)
    seconds: float
    calls: dict[str, int]  # UNet calls per step kind, as the engine saw them (summed over batches)


def _sample_batch(unet: UNet, scheduler, engine: StepEngine, x: torch.Tensor,
                  cond: Conditioning | None, prefixes: PrefixCache | None = None, batch: int = 0) -> torch.Tensor:
    engine.reset()
    # the model's device and dtype; the noise comes from the CPU and the sampler's arithmetic stays in float32
    device, dtype = placement(unet)
    x = x.to(device=device, dtype=torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)  # flow: none
    scale = getattr(scheduler, "scale_model_input", None)  # flow matching's Euler has none
    kwargs = cond.model_kwargs(x.shape[0]) if cond is not None else {}
    kwargs = to_model(kwargs, device, dtype)
    guided = cond is not None and cond.guided
    call = call_anatomy(unet)  # how the model takes the latents and the timestep (FLUX: packed, t / 1000)
    schedule, timesteps, start = engine.schedule, scheduler.timesteps, 0
    resume = prefixes.lookup(schedule, timesteps, batch) if prefixes is not None else None
    if resume is not None:  # an earlier run of the same first steps: go on from its state (prefixes.py)
        start, x = resume.step, resume.latents
        restore_scheduler(scheduler, resume.scheduler_state)
    for i, t in enumerate(timesteps[start:], start):
        if prefixes is not None and i > start:
            prefixes.store(schedule, timesteps, batch, i, x, scheduler)
        model_in = torch.cat([x, x]) if guided else x
        model_in = scale(model_in, t) if scale is not None else model_in
        # the timestep stays as the scheduler has it (float32 or int64): the engine places each call by it
        inputs = call.call_inputs(model_in.to(dtype), t.expand(model_in.shape[0]).to(device), kwargs)
        # full, partial or null: the engine decides. `eps` is what the model predicts (noise, or a flow's velocity)
        eps = call.call_output(unet(**inputs, **kwargs).sample.float(), model_in)
        eps = eps[:, :x.shape[1]]  # DiT / PixArt also predict a variance (learned sigma): their pipelines drop it
        if guided:  # classifier-free guidance (Ho & Salimans 2022): eps_u + w (eps_c - eps_u)
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + cond.guidance_scale * (eps_c - eps_u)
        x = scheduler.step(eps, t, x).prev_sample  # the sampler's update x_t -> x_{t-1}
    return x.float().cpu()


def sample(
    unet: UNet,
    scheduler_config: dict,
    schedule: Schedule,
    noise: torch.Tensor,
    batch_size: int = 250,
    cond: Conditioning | None = None,
    progress=None,
    description: str | None = None,
    prefixes: PrefixCache | None = None,
) -> SampleResult:
    """Draw one sample per row of `noise`, running `schedule` on `unet`.

    A class-conditional UNet2DModel without `cond` samples unconditionally (the null label).
    The hooks are attached for the call and removed afterwards, so `unet` is unchanged.
    `prefixes`: states of earlier runs on the same model, noise and conditioning to resume from where this
    schedule begins as one of them did (the images are the same; `calls` then counts only the calls that ran).
    """
    first = unet.experts[0] if is_mixture(unet) else unet  # a mixture: its experts' class
    if takes_text(first) and cond is None:
        raise FlexdiffError(f"this {type(first).__name__} is conditioned on text: pass conditioning "
                            "(encoder_hidden_states)")
    if prefixes is not None:  # the caller's objects: the same ones each call keep the cache
        prefixes.bind(unet, noise, cond, scheduler_config)
    cond = cond if cond is not None else null_conditioning(unet)
    schedule.check_fits(num_branches(unet), num_train_timesteps=num_train_timesteps(scheduler_config))
    scheduler = make_scheduler(schedule.sampler, scheduler_config)
    tokens = call_anatomy(unet).image_tokens(tuple(noise.shape[1:]))
    set_timesteps(scheduler, schedule, tokens)
    if len(scheduler.timesteps) != schedule.num_steps:
        raise FlexdiffError(
            f"{schedule.sampler} made {len(scheduler.timesteps)} timesteps for a {schedule.num_steps}-step schedule"
        )
    outs = []
    task = progress.add_task(description or schedule.name, total=len(noise)) if progress else None
    t0 = time.perf_counter()
    with StepEngine(unet, schedule, scheduler) as engine:
        for start in range(0, len(noise), batch_size):
            chunk = noise[start:start + batch_size]
            set_timesteps(scheduler, schedule, tokens)  # also resets the multistep solver's history
            part = cond.rows(start, start + len(chunk)) if cond is not None else None
            outs.append(_sample_batch(unet, scheduler, engine, chunk, part, prefixes, start))
            if task is not None:
                progress.update(task, advance=len(chunk))
        calls = dict(engine.calls)
    seconds = time.perf_counter() - t0
    if task is not None:
        progress.remove_task(task)
    images = torch.cat(outs)
    bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
    if bad:  # never hand NaN / inf images on as results
        raise FlexdiffError(f"{schedule.describe()}: {bad} of {len(images)} samples are not finite (NaN or inf); "
                            "the model or the schedule's timesteps do not fit together")
    return SampleResult(images=images, seconds=seconds, calls=calls)


def num_classes(unet) -> int | None:
    """Classes of a class-conditional model (its null label excluded); None for other models."""
    spec = class_spec(unet.experts[0] if is_mixture(unet) else unet)
    return None if spec is None else spec.classes


def parse_labels(text: str, classes: int, option: str = "--labels") -> tuple[int, ...]:
    """'all' (every class in turn) or comma-separated class indices, checked against the model."""
    if text.strip() == "all":
        return tuple(range(classes))
    try:
        labels = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FlexdiffError(f"{option} {text!r}: expected 'all' or comma-separated class indices, e.g. 3 or 0,1,7") from None
    bad = [v for v in labels if not 0 <= v < classes]
    if not labels or bad:
        raise FlexdiffError(f"{option} {text!r}: class indices must lie in 0..{classes - 1} (the model has {classes} classes)")
    return labels


def model_conditioning(model, n: int, labels: tuple[int, ...] = (), prompts: tuple[str, ...] = (),
                       negative: str | None = None, guidance: float = 1.0) -> Conditioning | None:
    """Conditioning of n samples of a loaded model: its prompts (a pipeline with text encoders; none =
    the empty prompt), else its class labels (see class_conditioning)."""
    if getattr(model, "has_text", False):
        if labels:
            raise FlexdiffError("--labels is for class-conditional models; this pipeline takes --prompt")
        return model.parts.encode_prompts(list(prompts) or [""], n, negative, guidance)
    if prompts or negative is not None:
        raise FlexdiffError(f"--prompt/--prompts/--negative-prompt: the model at {model.path} has no text encoder")
    return class_conditioning(model.unet, tuple(labels), n, guidance)


def class_conditioning(unet, labels: tuple[int, ...] | None, n: int, guidance: float = 1.0) -> Conditioning | None:
    """Conditioning of n samples of a class-conditional model: row i gets labels[i % len(labels)].

    No labels: unconditional (the null label), where guidance has nothing to contrast and is refused.
    A model without classes refuses labels.
    """
    spec = class_spec(unet.experts[0] if is_mixture(unet) else unet)
    if spec is None:
        if labels:
            raise FlexdiffError("--labels is only for class-conditional models (a UNet2DModel with num_class_embeds, "
                                "a DiT, or a transformer with label_tokens.json)")
        return None
    if not labels:
        if guidance != 1.0:
            raise FlexdiffError("--guidance needs --labels on a class-conditional model (unconditional sampling "
                                "uses the null label, which guidance contrasts with)")
        return null_conditioning(unet)
    rows = torch.tensor(labels, dtype=torch.long).repeat((n + len(labels) - 1) // len(labels))[:n]
    return Conditioning(class_labels=rows, null_label=spec.null, guidance_scale=guidance, tokens=spec.tokens)
