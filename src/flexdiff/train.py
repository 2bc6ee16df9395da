"""Training a diffusion UNet (epsilon prediction, DDPM noise schedule) with EMA and resumable checkpoints."""

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
from .models import DEFAULT_SCHEDULER_CONFIG, UNet2DModel, save_model


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250


def warmup_cosine(step: int, steps: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor` x peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _lr_at(step: int, cfg: TrainConfig) -> float:
    return warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr, floor=0.1)


def train(
    unet: UNet2DModel,
    images: torch.Tensor,
    out_dir: Path,
    cfg: TrainConfig = TrainConfig(),
    scheduler_config: dict | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress=None,
) -> dict:
    """Train `unet` on `images` ((N, C, H, W) in [-1, 1]); write the EMA model to `out_dir`.

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
    noise_sched = DDPMScheduler(**scheduler_config)
    alphas_cumprod = noise_sched.alphas_cumprod
    gen = torch.Generator().manual_seed(cfg.seed)
    unet.train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    start, losses, elapsed = 0, [], 0.0

    ckpt_path = out_dir / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["config"] != asdict(cfg):
            raise FlexdiffError(
                f"{ckpt_path}: checkpoint was written with other settings {ckpt['config']}; "
                "use the same settings to resume or another --out folder"
            )
        unet.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        start, losses, elapsed = ckpt["step"], ckpt["losses"], ckpt["elapsed"]

    def checkpoint(step: int) -> None:
        torch_save(
            ckpt_path,
            dict(
                model=unet.state_dict(),
                ema=ema.state_dict(),
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
        loss = F.mse_loss(unet(xt, t).sample, noise)
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
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoint(step + 1)

    final_loss = sum(losses[-200:]) / max(1, len(losses[-200:]))
    save_model(ema, scheduler_config, out_dir)
    summary = dict(
        config=asdict(cfg),
        steps=cfg.steps,
        final_loss_last200=final_loss,
        wall_time_s=elapsed,
        images=n,
    )
    write_json(out_dir / "training_summary.json", summary)
    unet.eval().requires_grad_(False)
    return summary
