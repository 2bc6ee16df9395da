"""One resumable fitting loop, for training, fine-tuning the experts and the routing agent.

What every long optimisation here shares: a learning-rate schedule, zeroing and stepping the
optimiser (with gradient clipping), a checkpoint every N steps holding the modules, the
optimiser, the one random generator and the loop's own state, and a settings guard that refuses
to resume a checkpoint written for something else. A killed run started again continues from the
last checkpoint and ends with the same result as an uninterrupted one: every random draw comes
from the checkpointed generator. Also the noising formulas of the forward processes (DDPM, flow).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from .errors import FlexdiffError
from .io import load_checkpoint, torch_save


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps: the forward process q(x_t | x_0) (DDPM eq. 4)."""
    a = alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def flow_noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x_0 + sigma eps: the rectified-flow path (Liu et al. 2023; SD3, Esser et al. 2024)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def predict(call, model, xt: torch.Tensor, t: torch.Tensor, kwargs: dict, **extra) -> torch.Tensor:
    """The model's prediction at latents xt (N, C, H, W) and timesteps t, called as its anatomy `call` says (a UNet:
    sample and timestep; FLUX: packed tokens, positions, t / 1000) with the conditioning `kwargs`; `extra` goes to
    the model only (an elastic model's `spec`)."""
    return call.call_output(model(**call.call_inputs(xt, t, kwargs), **kwargs, **extra).sample, xt)


class Objective:
    """What a denoiser learns at timestep t of `scheduler_config`'s process, and how it is called.

    DDPM: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, target eps. Flow matching (a FlowMatch* scheduler): sigma = t / T,
    x_sigma = (1 - sigma) x_0 + sigma eps, target the velocity eps - x_0 (the flow schedulers' timestep is sigma * T).
    Timesteps are integers in [0, T) in both, so intervals of timesteps mean the same thing for either."""

    def __init__(self, model, scheduler_config: dict):
        from .anatomy import call_anatomy
        from .samplers import is_flow, num_train_timesteps

        self.flow, self.T = is_flow(scheduler_config), num_train_timesteps(scheduler_config)
        self.alphas = None
        if not self.flow:
            from diffusers import DDPMScheduler

            clean = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
            self.alphas = DDPMScheduler.from_config(clean).alphas_cumprod
        self.call = call_anatomy(model)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return flow_noised(x0, noise, t.to(x0.dtype) / self.T)
        return noised(x0, noise, t, self.alphas.to(x0.device))

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0 if self.flow else noise

    def predict(self, model, xt: torch.Tensor, t: torch.Tensor, kwargs: dict, **extra) -> torch.Tensor:
        return predict(self.call, model, xt, t.to(xt.dtype) if self.flow else t, kwargs, **extra)


def warmup_cosine(step: int, steps: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor` x peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class Fit:
    """A resumable loop of `steps` optimiser steps, checkpointed to `ckpt_path`.

    `modules` are saved and restored by name; `state` is the loop's own data (histories, running
    scales), saved and restored with it; `tags` (settings, fingerprints) are saved, never restored:
    `refuse(checkpoint)` compares them and returns why a stored checkpoint cannot be resumed (None:
    it can). `what` names the run in messages.
    """

    def __init__(self, ckpt_path: Path, steps: int, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                 modules: dict[str, torch.nn.Module], *, checkpoint_every: int,
                 lr_at: Callable[[int], float] | None = None, clip: float | None = 1.0,
                 state: dict | None = None, tags: dict | None = None,
                 refuse: Callable[[dict], str | None] | None = None, what: str = "checkpoint"):
        self.ckpt_path, self.steps, self.optimizer, self.generator = Path(ckpt_path), steps, optimizer, generator
        self.modules, self.checkpoint_every, self.lr_at, self.clip = modules, checkpoint_every, lr_at, clip
        self.state, self.tags, self.what = dict(state or {}), dict(tags or {}), what
        self.step, self.losses, self.elapsed = 0, [], 0.0
        if self.ckpt_path.exists():
            self._resume(refuse)

    def _resume(self, refuse) -> None:
        ck = load_checkpoint(self.ckpt_path)
        expected = {"optimizer", "generator", "step", "losses", "elapsed", *self.modules}
        if not isinstance(ck, dict) or not expected <= set(ck):
            raise FlexdiffError(f"{self.ckpt_path}: not a flexdiff {self.what}; delete it or use another output "
                                "folder")
        why = refuse(ck) if refuse is not None else None
        if why:
            raise FlexdiffError(f"{self.ckpt_path}: {why}")
        for name, module in self.modules.items():
            module.load_state_dict(ck[name])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.generator.set_state(ck["generator"])
        self.step, self.losses, self.elapsed = ck["step"], ck["losses"], ck["elapsed"]
        self.state.update({k: ck[k] for k in self.state if k in ck})

    def save(self) -> None:
        torch_save(self.ckpt_path, {**{k: m.state_dict() for k, m in self.modules.items()}, **self.state, **self.tags,
                                    "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                                    "step": self.step, "losses": self.losses, "elapsed": self.elapsed})

    def run(self, step_loss: Callable[[int, torch.Generator], float], progress=None, description: str = "",
            describe: Callable[["Fit"], str] | None = None,
            after_step: Callable[[int], None] | None = None) -> "Fit":
        """`step_loss(step, generator)` draws its batch, runs forward and backward, and returns the loss;
        the loop sets the rate, zeroes the gradients before it, clips and steps after it, then calls
        `after_step(steps_done)` (EMA updates, snapshots)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        task = progress.add_task(description, total=self.steps, completed=self.step) if progress else None
        t0 = time.perf_counter() - self.elapsed
        for step in range(self.step, self.steps):
            if self.lr_at is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_at(step)
            self.optimizer.zero_grad(set_to_none=True)
            loss = step_loss(step, self.generator)
            if not math.isfinite(float(loss)):
                self._diverged(step, f"the loss is {float(loss)}")
            if self.clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, self.clip)
                if not torch.isfinite(norm):
                    self._diverged(step, f"the gradient norm is {float(norm)}")
            self.optimizer.step()
            if params and not torch.isfinite(torch.stack(torch._foreach_norm([p.detach() for p in params]))).all():
                self._diverged(step, "the weights are no longer finite after the optimiser's step")
            self.losses.append(float(loss))
            self.step, self.elapsed = step + 1, time.perf_counter() - t0
            if after_step is not None:
                after_step(self.step)
            if task is not None:
                progress.update(task, advance=1, description=describe(self) if describe else description)
            if self.step % self.checkpoint_every == 0 or self.step == self.steps:
                self.save()
        if task is not None:
            progress.remove_task(task)
        return self

    def _diverged(self, step: int, why: str) -> None:
        """Stop before anything non-finite is saved: the last checkpoint (written before this step) stays."""
        kept = (f"the last good checkpoint (step {self.step}) is kept in {self.ckpt_path}" if self.ckpt_path.exists()
                else "no checkpoint was written yet")
        raise FlexdiffError(f"{self.what} diverged at step {step + 1}: {why}; nothing was saved from it and {kept}. "
                            "Lower the learning rate (or check the data) and run again")

    def mean_loss(self, last: int) -> float:
        tail = self.losses[-last:]
        return sum(tail) / max(1, len(tail))
