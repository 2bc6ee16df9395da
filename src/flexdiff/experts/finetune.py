"""Fine-tuning on a timestep interval with distillation from the teacher, checkpointed and resumable.

One loop serves three jobs: the elastic experts (sandwich rule), the extracted experts, and the
single pruned baseline (its "interval" is every timestep). Loss per sub-network (our choice):
    || eps_theta(x_t, t) - eps ||^2 + distill * || eps_theta(x_t, t) - eps_teacher(x_t, t) ||^2
All randomness comes from one generator whose state is checkpointed, so a killed run resumes to
the same weights as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..configs import Config
from ..errors import FlexdiffError
from ..fit import Fit, Objective, warmup_cosine


@dataclass(frozen=True)
class TuneConfig(Config):
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
    """Noised training batches whose timesteps lie in [lo, hi], with their target and the teacher's prediction.

    The objective follows the model's scheduler (`fit.Objective`: epsilon on the DDPM process, or the velocity on
    the flow-matching path) and so does the call (a UNet's, or FLUX's packed tokens). For a class-conditional
    model, `labels` (one per image) and `classes` (its ClassSpec): each batch carries the model's label inputs, a
    share `label_dropout` of them replaced by the null label (as in the teacher's training), so the experts keep
    serving unconditional and guided sampling.
    """

    def __init__(self, images: torch.Tensor, scheduler_config: dict, lo: int, hi: int, teacher=None,
                 labels: torch.Tensor | None = None, classes=None, label_dropout: float = 0.1, model=None):
        if teacher is None and model is None:
            raise FlexdiffError("interval batches need the teacher (or, without distillation, a model of its kind)")
        self.objective = Objective(teacher if teacher is not None else model, scheduler_config)
        if not 0 <= lo <= hi < self.objective.T:
            raise FlexdiffError(f"interval [{lo}, {hi}] is outside the model's timesteps 0..{self.objective.T - 1}")
        if (labels is None) != (classes is None):
            raise FlexdiffError("class-conditional batches need both the labels and the model's class spec")
        self.images, self.lo, self.hi, self.teacher = images, lo, hi, teacher
        self.labels, self.classes, self.label_dropout = labels, classes, label_dropout

    def predict(self, model, xt: torch.Tensor, t: torch.Tensor, kwargs: dict, **extra) -> torch.Tensor:
        """`model`'s prediction on a batch (`extra`: an elastic model's `spec`)."""
        return self.objective.predict(model, xt, t, kwargs, **extra)

    def draw(self, n: int, gen: torch.Generator):
        """(x_t, t, the regression target, the teacher's prediction (None without a teacher), the model's
        conditioning keyword arguments)."""
        idx = torch.randint(0, len(self.images), (n,), generator=gen)
        x0 = self.images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(self.lo, self.hi + 1, (n,), generator=gen)
        xt = self.objective.noised(x0, noise, t)
        kwargs = {}
        if self.labels is not None:
            y = self.labels[idx].clone()
            y[torch.rand(n, generator=gen) < self.label_dropout] = self.classes.null
            kwargs = self.classes.kwargs(y)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.predict(self.teacher, xt, t, kwargs)
        return xt, t, self.objective.target(x0, noise), teacher, kwargs


def denoise_loss(pred, target, teacher_pred, distill: float):
    loss = F.mse_loss(pred, target)
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
    settings = asdict(cfg)

    def refuse(ck: dict) -> str | None:
        if ck.get("config") != settings:
            return (f"written with other settings {ck.get('config')}; use the same settings to resume, or another "
                    "output folder")
        return None

    fit = Fit(ckpt_path, cfg.steps, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0),
              torch.Generator().manual_seed(cfg.seed), state_modules, checkpoint_every=cfg.checkpoint_every,
              lr_at=lambda step: lr_at(step, cfg), tags={"config": settings}, refuse=refuse,
              what="fine-tuning checkpoint")
    fit.run(lambda step, gen: float(step_loss(gen)), progress, description,
            describe=lambda f: f"{description} loss {f.mean_loss(20):.4f}")
    return dict(steps=cfg.steps, final_loss_last50=fit.mean_loss(50), wall_time_s=fit.elapsed)


def tune_static(model, batches: IntervalBatches, ckpt_path: Path, cfg: TuneConfig, progress=None,
                description: str = "fine-tuning") -> dict:
    """Fine-tune a plain UNet on its interval (extracted experts, the pruned baseline)."""
    model.train().requires_grad_(True)

    def step_loss(gen):
        xt, t, target, teacher, kw = batches.draw(cfg.batch_size, gen)
        loss = denoise_loss(batches.predict(model, xt, t, kw), target, teacher, cfg.distill)
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
        xt, t, target, teacher, kw = batches.draw(cfg.batch_size, gen)
        specs = [elastic.full, elastic.smallest()] + [elastic.random_spec(gen) for _ in range(random_per_step)]
        total = 0.0
        for spec in specs:
            loss = denoise_loss(batches.predict(elastic, xt, t, kw, spec=spec), target, teacher, cfg.distill) / len(specs)
            loss.backward()  # gradients of all sub-networks add up on the shared full weights
            total += float(loss.detach())
        return torch.tensor(total)

    try:
        return tune(list(unet.parameters()), {"unet": unet}, step_loss, ckpt_path, cfg, progress, description)
    finally:
        unet.eval().requires_grad_(False)


def taylor_importance(elastic, batches: IntervalBatches, num_batches: int = 8, batch_size: int = 64,
                      seed: int = 0) -> tuple[dict[str, torch.Tensor], list[float] | None]:
    """First-order Taylor importance on the interval's denoising loss: accumulated |w * dL/dw| per parameter of the
    full network, and the loss of each of the elastic model's probe sub-networks (a transformer: each block dropped
    alone) on the same batches, or None where it has none. What `elastic.apply_importance` takes."""
    unet = elastic.unet
    gen = torch.Generator().manual_seed(seed)
    params = dict(unet.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    probes = elastic.probe_specs()
    probe_loss = [0.0] * len(probes)
    unet.requires_grad_(True)
    try:
        for _ in range(num_batches):
            xt, t, target, _, kw = batches.draw(batch_size, gen)
            unet.zero_grad(set_to_none=True)
            F.mse_loss(batches.predict(unet, xt, t, kw), target).backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] += (p.detach() * p.grad).abs()
            with torch.no_grad():
                for i, spec in enumerate(probes):
                    pred = batches.predict(lambda **a: elastic.probe(spec, (), a), xt, t, kw)
                    probe_loss[i] += float(F.mse_loss(pred, target)) / num_batches
    finally:
        unet.zero_grad(set_to_none=True)
        unet.requires_grad_(False)
    return acc, (probe_loss if probes else None)
