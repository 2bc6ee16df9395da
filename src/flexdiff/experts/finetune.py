"""Fine-tuning on a timestep interval with distillation from the teacher, checkpointed and resumable.

One loop serves three jobs: the elastic experts (sandwich rule), the extracted experts, and the
single pruned baseline (its "interval" is every timestep). Loss per sub-network (our choice):
    || eps_theta(x_t, t) - eps ||^2 + distill * || eps_theta(x_t, t) - eps_teacher(x_t, t) ||^2
All randomness comes from one generator whose state is checkpointed, so a killed run resumes to
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..errors import FlexdiffError
from ..io import load_checkpoint, torch_save
from ..train import warmup_cosine


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 20
    distill: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50


def lr_at(step: int, cfg: TuneConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    return warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr, floor=0.0)


class IntervalBatches:
    """Noised training batches whose timesteps lie in [lo, hi], with the teacher's prediction.

    For a class-conditional model, `labels` (one per image) and the model's `null_label`: each
    batch carries `class_labels`, a share `label_dropout` of them replaced by the null label (as
    in the teacher's training), so the experts keep serving unconditional and guided sampling.
    """

    def __init__(self, images: torch.Tensor, scheduler_config: dict, lo: int, hi: int, teacher=None,
                 labels: torch.Tensor | None = None, null_label: int | None = None, label_dropout: float = 0.1):
        cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        self.alphas = DDPMScheduler.from_config(cfg).alphas_cumprod
        if not 0 <= lo <= hi < len(self.alphas):
            raise FlexdiffError(f"interval [{lo}, {hi}] is outside the model's timesteps 0..{len(self.alphas) - 1}")
        if (labels is None) != (null_label is None):
            raise FlexdiffError("class-conditional batches need both the labels and the model's null label")
        self.images, self.lo, self.hi, self.teacher = images, lo, hi, teacher
        self.labels, self.null_label, self.label_dropout = labels, null_label, label_dropout

    def draw(self, n: int, gen: torch.Generator):
        """(x_t, t, noise, teacher's prediction or None, extra UNet keyword arguments)."""
        idx = torch.randint(0, len(self.images), (n,), generator=gen)
        x0 = self.images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(self.lo, self.hi + 1, (n,), generator=gen)
        a = self.alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0), DDPM eq. 4
        kwargs = {}
        if self.labels is not None:
            y = self.labels[idx].clone()
            y[torch.rand(n, generator=gen) < self.label_dropout] = self.null_label
            kwargs["class_labels"] = y
        target = None
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(xt, t, **kwargs).sample
        return xt, t, noise, target, kwargs


def denoise_loss(pred, noise, teacher_pred, distill: float):
    loss = F.mse_loss(pred, noise)
    if teacher_pred is not None and distill > 0:
        loss = loss + distill * F.mse_loss(pred, teacher_pred)
    return loss


def tune(
    params: list[torch.nn.Parameter],
    state_modules: dict[str, torch.nn.Module],
    step_loss: Callable[[torch.Generator], torch.Tensor],
    ckpt_path: Path,
    cfg: TuneConfig,
    progress=None,
    description: str = "fine-tuning",
) -> dict:
    """Run `cfg.steps` AdamW steps of `step_loss` (which does its own backward and returns the loss).

    `state_modules` are saved in the checkpoint (and restored from it when resuming).
    """
    ckpt_path = Path(ckpt_path)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    start, losses, elapsed = 0, [], 0.0
    if ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if ck["config"] != asdict(cfg):
            raise FlexdiffError(f"{ckpt_path}: written with other settings {ck['config']}; use the same settings "
                                "to resume, or another output folder")
        for name, module in state_modules.items():
            module.load_state_dict(ck["modules"][name])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        start, losses, elapsed = ck["step"], ck["losses"], ck["elapsed"]

    def checkpoint(step: int) -> None:
        torch_save(ckpt_path, dict(modules={k: m.state_dict() for k, m in state_modules.items()},
                                   optimizer=opt.state_dict(), generator=gen.get_state(), step=step,
                                   losses=losses, elapsed=elapsed, config=asdict(cfg)))

    task = progress.add_task(description, total=cfg.steps, completed=start) if progress else None
    t0 = time.perf_counter() - elapsed
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss = step_loss(gen)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss))
        elapsed = time.perf_counter() - t0
        if task is not None:
            recent = sum(losses[-20:]) / len(losses[-20:])
            progress.update(task, advance=1, description=f"{description} loss {recent:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoint(step + 1)
    if task is not None:
        progress.remove_task(task)
    tail = losses[-50:]
    return dict(steps=cfg.steps, final_loss_last50=sum(tail) / max(1, len(tail)), wall_time_s=elapsed)


def tune_static(model, batches: IntervalBatches, ckpt_path: Path, cfg: TuneConfig, progress=None,
                description: str = "fine-tuning") -> dict:
    """Fine-tune a plain UNet on its interval (extracted experts, the pruned baseline)."""
    model.train().requires_grad_(True)

    def step_loss(gen):
        xt, t, noise, target, kw = batches.draw(cfg.batch_size, gen)
        loss = denoise_loss(model(xt, t, **kw).sample, noise, target, cfg.distill)
        loss.backward()
        return loss.detach()

    try:
        return tune(list(model.parameters()), {"model": model}, step_loss, ckpt_path, cfg, progress, description)
    finally:
        model.eval().requires_grad_(False)


def tune_elastic(elastic, batches: IntervalBatches, ckpt_path: Path, cfg: TuneConfig, random_per_step: int = 2,
                 progress=None, description: str = "elastic fine-tuning") -> dict:
    """Sandwich rule (Yu & Huang 2019): the largest, the smallest and random sub-networks every step."""
    unet = elastic.unet
    unet.train().requires_grad_(True)

    def step_loss(gen):
        xt, t, noise, target, kw = batches.draw(cfg.batch_size, gen)
        specs = [elastic.full, elastic.smallest()] + [elastic.random_spec(gen) for _ in range(random_per_step)]
        total = 0.0
        for spec in specs:
            loss = denoise_loss(elastic(xt, t, spec=spec, **kw).sample, noise, target, cfg.distill) / len(specs)
            loss.backward()  # gradients of all sub-networks add up on the shared full weights
            total += float(loss.detach())
        return torch.tensor(total)

    try:
        return tune(list(unet.parameters()), {"unet": unet}, step_loss, ckpt_path, cfg, progress, description)
    finally:
        unet.eval().requires_grad_(False)


def taylor_importance(elastic, batches: IntervalBatches, num_batches: int = 8, batch_size: int = 64,
                      seed: int = 0) -> dict[int, torch.Tensor]:
    """Per-channel first-order Taylor importance of every stage, on the interval's denoising loss."""
    from .elastic import stage_scores

    unet = elastic.unet
    gen = torch.Generator().manual_seed(seed)
    params = dict(unet.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    unet.requires_grad_(True)
    try:
        for _ in range(num_batches):
            xt, t, noise, _, kw = batches.draw(batch_size, gen)
            unet.zero_grad(set_to_none=True)
            F.mse_loss(unet(xt, t, **kw).sample, noise).backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] += (p.detach() * p.grad).abs()
    finally:
        unet.zero_grad(set_to_none=True)
        unet.requires_grad_(False)
    return stage_scores(elastic, acc)
