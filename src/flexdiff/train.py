"""Training a denoiser with EMA and resumable checkpoints: a UNet (epsilon prediction, DDPM noise schedule) or
a transformer (flow matching: velocity target, logit-normal timesteps as SD3 trains them).

Class-conditional models (a UNet2DModel with `num_class_embeds`, or a transformer given its labels as one-hot
tokens, `conditioning.LabelTokens`) are trained with label dropout: the last class index is the *null* label,
so one model samples unconditionally and with classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .anatomy import call_anatomy
from .conditioning import LabelTokens, label_inputs
from .configs import Config
from .devices import CPU_FLOAT32, autocast, move, runs_on, training_dtype
from .errors import FlexdiffError
from .fingerprints import data_fingerprint
from .fit import Fit, flow_noised, noised, predict, warmup_cosine
from .io import write_json
from .models import UNet2DModel, save_model
from .samplers import DEFAULT_SCHEDULER_CONFIG, is_flow, num_train_timesteps


@dataclass(frozen=True)
class TrainConfig(Config):
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250
    # "cosine": warm-up then cosine decay to 10% at `steps`. "constant": warm-up then a flat
    # rate, so a finished run can be extended to more steps and resumed (the convergence check).
    lr_schedule: str = "cosine"
    label_dropout: float = 0.1  # fraction of labels replaced by the null label (conditional models)
    snapshot_every: int = 0  # also save the EMA model every N steps under snapshots/ (0: never)
    # the weights fingerprint of the model the run started from (`flexdiff train --init-from`), "" for a fresh
    # initialisation from `seed`: part of the run's identity, so a checkpoint resumes only from the same start
    init_from: str = ""

    def check(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise FlexdiffError(f"--lr-schedule {self.lr_schedule!r}: accepted values are {', '.join(LR_SCHEDULES)}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise FlexdiffError(f"--lr {self.lr}: must be a finite number above 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise FlexdiffError(f"--ema-decay {self.ema_decay}: must be in [0, 1]")
        if not 0.0 <= self.label_dropout < 1.0:
            raise FlexdiffError(f"--label-dropout {self.label_dropout}: must be in [0, 1)")

    def resume_key(self) -> dict:
        """The settings a checkpoint must share to be resumed: with a constant rate, `steps` may grow."""
        key = asdict(self)
        if self.lr_schedule == "constant":
            key.pop("steps")
        return key


LR_SCHEDULES = ("cosine", "constant")


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    return warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr, floor=0.1)


def null_label(unet, tokens: LabelTokens | None = None) -> int | None:
    """The unconditional class index of a class-conditional model (its last one); None otherwise."""
    n = tokens.classes if tokens is not None else getattr(unet.config, "num_class_embeds", None)
    return None if n is None else n - 1


def _predict(model, call, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, tokens: LabelTokens | None):
    """The model's prediction at xt, called as its anatomy `call` says (FLUX: packed latents, t / 1000)."""
    kwargs = {} if y is None else label_inputs(y, tokens)
    return predict(call, model, xt, t, kwargs)


def debiased_ema(ema, init: dict[str, torch.Tensor], decay: float, step: int):
    """The EMA with the initial weights' share removed (Adam-style bias correction).

    After t updates e_t = d^t theta_0 + (1 - d) sum_s d^(t-s) theta_s: with d = 0.9995 and t = 2,500
    the random initialisation still holds 29% of the weight, and its samples are noise. Removing
    d^t theta_0 and renormalising leaves the average of the trained weights only.
    """
    share = decay ** step
    out = copy.deepcopy(ema)
    if share >= 1.0:
        return out
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_((p - share * init[name]) / (1 - share))
    return out


def train(
    unet: UNet2DModel,
    images: torch.Tensor,
    out_dir: Path,
    cfg: TrainConfig = TrainConfig(),
    scheduler_config: dict | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress=None,
    labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokens: LabelTokens | None = None,
) -> dict:
    """Train `unet` (a UNet, or a transformer: `tokens` then says how it takes its labels) on `images` ((N, C, H, W) in [-1, 1]); write the EMA model to `out_dir`.

    `device`: where it trains; `dtype`: float32, or bfloat16 autocast over float32 master weights. Every random
    draw is made on the CPU from the checkpointed generator and then moved, so a run's batches are the same
    everywhere; the device type and dtype are part of the run's identity (a checkpoint resumes only there).

    The objective follows `scheduler_config`: flow matching for a FlowMatch* scheduler, else epsilon prediction.
    A class-conditional model needs `labels` (N integers in [0, num_class_embeds - 1)); a share
    `cfg.label_dropout` of them is replaced by the null label at every step.

    A checkpoint (`out_dir/checkpoint.pt`) is written every `cfg.checkpoint_every` steps; a run
    started again with the same arguments resumes from it and ends with the same weights as an
    uninterrupted run (all randomness comes from one generator whose state is checkpointed).
    """
    out_dir = Path(out_dir)
    scheduler_config = dict(scheduler_config or DEFAULT_SCHEDULER_CONFIG)
    call = call_anatomy(unet)  # how the model is called (looked up once: every step uses it)
    channels = call.latent_channels()  # FLUX's in_channels count packed 2 x 2 patches
    if images.ndim != 4 or images.shape[1] != channels:
        raise FlexdiffError(f"data has shape {tuple(images.shape)}; the model expects (N, {channels}, H, W)")
    null = null_label(unet, tokens)
    if null is not None:
        if labels is None or labels.shape != (images.shape[0],):
            raise FlexdiffError(
                f"the model is class-conditional ({null} classes + the null label): give one label per image"
            )
        if int(labels.min()) < 0 or int(labels.max()) >= null:
            raise FlexdiffError(f"labels must lie in 0..{null - 1} (the model has {null} classes)")
    device, dtype = torch.device(device), training_dtype(dtype)
    where = runs_on(device, dtype)
    flow = is_flow(scheduler_config)
    steps_T = num_train_timesteps(scheduler_config)
    alphas_cumprod = None if flow else DDPMScheduler(
        **{k: v for k, v in scheduler_config.items() if not k.startswith("_")}).alphas_cumprod.to(device)
    move(unet, device, torch.float32).train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    init = {k: v.detach().clone() for k, v in unet.named_parameters()}  # theta_0, for the EMA's bias correction
    data_fp = data_fingerprint(images, labels)

    def refuse(ck: dict) -> str | None:
        if ck.get("runs_on", CPU_FLOAT32) != where:
            return (f"this run was trained on {ck.get('runs_on', CPU_FLOAT32)}, now {where}: resume it with the same "
                    "--device and --dtype, or use another --out folder")
        if ck.get("data", data_fp) != data_fp:
            return (f"this run was trained on other data (fingerprint {ck['data']}, now {data_fp}); use the same "
                    "--data to resume, or another --out folder")
        try:
            saved = TrainConfig(**ck["config"]) if isinstance(ck.get("config"), dict) else None
        except (TypeError, FlexdiffError):
            saved = None
        if saved is None:
            return f"checkpoint was written with settings this flexdiff cannot read ({ck.get('config')}); use another --out folder"
        old, new = saved.resume_key(), cfg.resume_key()
        changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
        if changed:
            said = ", ".join(f"--{k.replace('_', '-')} {a} then, {b} now" for k, (a, b) in changed.items())
            return f"checkpoint was written with other settings ({said}); use the same settings to resume or another --out folder"
        if ck["step"] > cfg.steps:
            return (f"checkpoint is at step {ck['step']}, beyond --steps {cfg.steps}; give --steps {ck['step']} or more, "
                    "or another --out folder")
        return None

    fit = Fit(out_dir / "checkpoint.pt", cfg.steps, torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0),
              torch.Generator().manual_seed(cfg.seed), {"model": unet, "ema": ema},
              checkpoint_every=cfg.checkpoint_every, lr_at=lambda step: _lr_at(step, cfg),
              state={"init": init},  # checkpoints from before the bias correction: the same seed made theta_0
              tags={"data": data_fp, "config": asdict(cfg), **({} if where == CPU_FLOAT32 else {"runs_on": where})},
              refuse=refuse, what="training checkpoint")
    n = images.shape[0]

    def step_loss(step: int, gen: torch.Generator) -> float:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=gen)  # drawn on the CPU, then moved: the same batches everywhere
        if flow:  # logit-normal sigma (SD3's training density), timestep = sigma * T as the flow schedulers use it
            sigma = torch.randn(cfg.batch_size, generator=gen).sigmoid()
            x0, noise, sigma = x0.to(device), noise.to(device), sigma.to(device)
            xt, t, target = flow_noised(x0, noise, sigma), sigma * steps_T, noise - x0
        else:
            t = torch.randint(0, steps_T, (cfg.batch_size,), generator=gen)
            x0, noise, t = x0.to(device), noise.to(device), t.to(device)
            xt, target = noised(x0, noise, t, alphas_cumprod), noise
        y = None
        if null is not None:  # label dropout teaches the null label: the unconditional half of guidance
            y = labels[idx].clone()
            y[torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout] = null
            y = y.to(device)
        with autocast(device, dtype):
            pred = _predict(unet, call, xt, t, y, tokens)
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        return loss.item()

    def after_step(done: int) -> None:
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pm, 1 - cfg.ema_decay)
        if on_step is not None:
            on_step(done, fit.losses[-1])
        if cfg.snapshot_every and done % cfg.snapshot_every == 0:
            save_model(debiased_ema(ema, fit.state["init"], cfg.ema_decay, done), scheduler_config,
                       out_dir / "snapshots" / f"step-{done:06d}", tokens)

    if cfg.snapshot_every and cfg.init_from and not fit.losses:  # a continued run: its step 0 is the model it began
        save_model(copy.deepcopy(unet).eval(), scheduler_config, out_dir / "snapshots" / "step-000000", tokens)
    fit.run(step_loss, progress, "training", describe=lambda f: f"training loss {f.mean_loss(50):.4f}",
            after_step=after_step)
    losses, elapsed, init = fit.losses, fit.elapsed, fit.state["init"]
    final_loss = sum(losses[-200:]) / max(1, len(losses[-200:]))
    save_model(debiased_ema(ema, init, cfg.ema_decay, cfg.steps), scheduler_config, out_dir, tokens)
    summary = dict(
        config=asdict(cfg),
        steps=cfg.steps,
        final_loss_last200=final_loss,
        wall_time_s=elapsed,
        images=n,
    )
    write_json(out_dir / "training_summary.json", summary)
    write_json(out_dir / "losses.json", losses)  # the loss curve, for the model card's plot
    unet.eval().requires_grad_(False)
    summary["runs_on"] = where
    return summary
