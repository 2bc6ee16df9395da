"""Training a diffusion UNet (epsilon prediction, DDPM noise schedule) with EMA and resumable checkpoints.

Class-conditional models (a UNet2DModel with `num_class_embeds`) are trained with label dropout:
the last class index is the *null* label, so one model samples unconditionally and with
classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .errors import FlexdiffError
from .io import load_checkpoint, torch_save, write_json
from .models import DEFAULT_SCHEDULER_CONFIG, UNet2DModel, data_fingerprint, save_model


@dataclass(frozen=True)
class TrainConfig:
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

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise FlexdiffError(f"--lr-schedule {self.lr_schedule!r}: accepted values are {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise FlexdiffError(f"--label-dropout {self.label_dropout}: must be in [0, 1)")

    def resume_key(self) -> dict:
        """The settings a checkpoint must share to be resumed: with a constant rate, `steps` may grow."""
        key = asdict(self)
        if self.lr_schedule == "constant":
            key.pop("steps")
        return key


LR_SCHEDULES = ("cosine", "constant")


def warmup_cosine(step: int, steps: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor` x peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    return warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr, floor=0.1)


def null_label(unet) -> int | None:
    """The unconditional class index of a class-conditional UNet2DModel (its last one); None otherwise."""
    n = getattr(unet.config, "num_class_embeds", None)
    return None if n is None else n - 1


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
) -> dict:
    """Train `unet` on `images` ((N, C, H, W) in [-1, 1]); write the EMA model to `out_dir`.

    A class-conditional UNet needs `labels` (N integers in [0, num_class_embeds - 1)); a share
    `cfg.label_dropout` of them is replaced by the null label at every step.

    A checkpoint (`out_dir/checkpoint.pt`) is written every `cfg.checkpoint_every` steps; a run
    started again with the same arguments resumes from it and ends with the same weights as an
    uninterrupted run (all randomness comes from one generator whose state is checkpointed).
    """
    out_dir = Path(out_dir)
    scheduler_config = dict(scheduler_config or DEFAULT_SCHEDULER_CONFIG)
    if images.ndim != 4 or images.shape[1] != unet.config.in_channels:
        raise FlexdiffError(
            f"data has shape {tuple(images.shape)}; the model expects "
            f"(N, {unet.config.in_channels}, H, W)"
        )
    null = null_label(unet)
    if null is not None:
        if labels is None or labels.shape != (images.shape[0],):
            raise FlexdiffError(
                f"the model is class-conditional ({null} classes + the null label): give one label per image"
            )
        if int(labels.min()) < 0 or int(labels.max()) >= null:
            raise FlexdiffError(f"labels must lie in 0..{null - 1} (the model has {null} classes)")
    noise_sched = DDPMScheduler(**scheduler_config)
    alphas_cumprod = noise_sched.alphas_cumprod
    gen = torch.Generator().manual_seed(cfg.seed)
    unet.train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    init = {k: v.detach().clone() for k, v in unet.named_parameters()}  # theta_0, for the EMA's bias correction
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    start, losses, elapsed = 0, [], 0.0

    data_fp = data_fingerprint(images, labels)
    ckpt_path = out_dir / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise FlexdiffError(f"{ckpt_path}: not a flexdiff training checkpoint; delete it or use another --out folder")
        if ckpt.get("data", data_fp) != data_fp:
            raise FlexdiffError(f"{ckpt_path}: this run was trained on other data (fingerprint {ckpt['data']}, now "
                                f"{data_fp}); use the same --data to resume, or another --out folder")
        saved = TrainConfig(**ckpt["config"]) if isinstance(ckpt.get("config"), dict) else None
        if saved is None or saved.resume_key() != cfg.resume_key() or ckpt["step"] > cfg.steps:
            raise FlexdiffError(
                f"{ckpt_path}: checkpoint was written with other settings {ckpt['config']}; "
                "use the same settings to resume or another --out folder"
            )
        unet.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        init = ckpt.get("init", init)  # checkpoints from before the bias correction: the same seed made theta_0
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        start, losses, elapsed = ckpt["step"], ckpt["losses"], ckpt["elapsed"]

    def checkpoint(step: int) -> None:
        torch_save(
            ckpt_path,
            dict(
                model=unet.state_dict(),
                ema=ema.state_dict(),
                init=init,
                data=data_fp,
                optimizer=opt.state_dict(),
                generator=gen.get_state(),
                step=step,
                losses=losses,
                elapsed=elapsed,
                config=asdict(cfg),
            ),
        )

    task = progress.add_task("training", total=cfg.steps, completed=start) if progress else None
    n = images.shape[0]
    t0 = time.perf_counter() - elapsed
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas_cumprod), (cfg.batch_size,), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # forward process q(x_t | x_0), DDPM eq. 4
        if null is None:
            pred = unet(xt, t).sample
        else:  # label dropout teaches the null label: the unconditional half of guidance
            y = labels[idx].clone()
            y[torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout] = null
            pred = unet(xt, t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pm, 1 - cfg.ema_decay)
        losses.append(loss.item())
        elapsed = time.perf_counter() - t0
        if task is not None:
            recent = sum(losses[-50:]) / len(losses[-50:])
            progress.update(task, advance=1, description=f"training loss {recent:.4f}")
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
            save_model(debiased_ema(ema, init, cfg.ema_decay, step + 1), scheduler_config,
                       out_dir / "snapshots" / f"step-{step + 1:06d}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoint(step + 1)

    final_loss = sum(losses[-200:]) / max(1, len(losses[-200:]))
    save_model(debiased_ema(ema, init, cfg.ema_decay, cfg.steps), scheduler_config, out_dir)
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
    return summary
