"""Fitness of a schedule: how far its samples are from the teacher's, on fixed evaluation noise."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..anatomy import noise_shape
from ..errors import FlexdiffError
from ..fingerprints import conditioning_tag
from ..io import load_cache, save_safetensors
from ..metrics import QualityMeter
from ..metrics.fid import fid
from ..models import LoadedModel
from ..prefixes import PrefixCache
from ..sampling import initial_noise, model_conditioning, sample
from ..schedule import Schedule

METRICS = ("rfid", "distance", "fid")
# added to the fitness of a candidate whose class mix is separated worse than the teacher's (docs/search.md): it then
# ranks after every candidate that keeps the mix, whatever their metric values (which stay far below this)
CLASS_MIX_PENALTY = 1000.0


def default_metric(meter) -> str:
    """rFID to the teacher's samples; on pooled pixels (no real data, no feature network) the per-sample
    distance, as an FID over thousands of pixel dimensions from a few hundred samples is not defined."""
    return "distance" if getattr(meter, "name", None) == "pixels" else "rfid"


class Fitness:
    """Scores schedules on one fixed set of initial noises (lower is better).

    - rfid: Fréchet distance between the candidate's samples and the teacher's from the same
      noise (Flexiffusion's relative FID);
    - distance: mean per-sample feature distance to the teacher (cheaper to estimate well);
    - fid: the meter's headline quality against the real data (AutoDiffusion's fitness: FID; on
      the digits, the class-balanced distance of docs/metrics.md).
    rfid and distance use the meter's standardised features.
    With a classifier (the digits space) and `class_guard`, a candidate whose class mix is separated worse than
    the teacher's on the same noise (paired class TV difference, its 95% interval above 0) scores its metric
    plus CLASS_MIX_PENALTY: a Fréchet distance that balances the classes cannot see a shifted class mix, and a
    schedule must not win by shifting it (docs/metrics.md, "the rule").
    The teacher's features are computed once and stored in `workdir`.
    """

    def __init__(self, model: LoadedModel, meter: QualityMeter, teacher: Schedule, metric: str,
                 samples: int, seed: int, workdir: Path, batch_size: int = 256, progress=None,
                 labels: tuple[int, ...] = (), guidance: float = 1.0, teacher_features: np.ndarray | None = None,
                 prompts: tuple[str, ...] = (), negative_prompt: str | None = None, class_guard: bool = True):
        if metric not in METRICS:
            raise FlexdiffError(f"--metric {metric!r}: accepted values are {', '.join(METRICS)}")
        self.model, self.meter, self.metric, self.batch_size = model, meter, metric, batch_size
        self.progress = progress
        self.class_guard = class_guard and getattr(meter, "classify", None) is not None
        # what a worker needs to score like this one (see worker_args)
        self._args = dict(teacher=teacher, metric=metric, samples=samples, seed=seed, workdir=workdir,
                          batch_size=batch_size, labels=tuple(labels), guidance=guidance, prompts=tuple(prompts),
                          negative_prompt=negative_prompt, class_guard=class_guard)
        self.noise = initial_noise(samples, noise_shape(model.unet), seed)
        # candidates that begin with the same steps resume from one another's states (exact; prefixes.py)
        self.prefixes = PrefixCache()
        self.cond = model_conditioning(model, samples, tuple(labels), tuple(prompts), negative_prompt, guidance)
        # the teacher's images depend on the labels, prompts and guidance: all in the cache's name
        tag = conditioning_tag(tuple(labels), guidance, tuple(prompts), negative_prompt)
        path = Path(workdir) / f"teacher-{teacher.num_steps}-{samples}-{seed}{tag}.safetensors"
        stored = (load_cache(path) or {}).get("features")  # a truncated file from a killed run is redrawn
        if teacher_features is not None:  # a worker: the driver drew them
            self.teacher = teacher_features
        elif stored is not None and tuple(stored.shape) == (samples, meter.feature_dim):
            self.teacher = stored.numpy()
        else:  # none yet, or from another feature space
            images = self._images(teacher, "teacher")
            self.teacher = meter.features(images)
            save_safetensors(path, {"features": torch.from_numpy(self.teacher)})

    def worker_args(self) -> dict:
        """Keyword arguments that rebuild this fitness elsewhere (a Ray worker) without redrawing the teacher."""
        return dict(self._args, teacher_features=self.teacher)

    def _images(self, schedule: Schedule, description: str, prefixes: PrefixCache | None = None) -> torch.Tensor:
        latents = sample(self.model.unet, self.model.scheduler_config, schedule, self.noise, self.batch_size,
                         cond=self.cond, progress=self.progress, description=description, prefixes=prefixes).images
        return self.model.decode(latents)  # scored on the images a user sees

    def features(self, schedule: Schedule) -> np.ndarray:
        return self.meter.features(self._images(schedule, schedule.describe(), self.prefixes))

    def score(self, feats: np.ndarray, metric: str | None = None) -> float:
        """The fitness of features drawn on the evaluation noise (by this fitness's metric, or `metric`)."""
        from threadpoolctl import threadpool_limits

        metric = metric or self.metric
        # one BLAS thread: a Ray worker (Ray sets one OpenMP thread) and the driver then sum in the same order
        # and score bit-identically, so a parallel search equals a serial one under FID-type fitnesses too
        with threadpool_limits(limits=1):
            if metric == "fid":
                value = self.meter.quality(feats)
            else:
                z, zt = self.meter.standardised(feats), self.meter.standardised(self.teacher)
                value = fid(z, zt) if metric == "rfid" else float(np.linalg.norm(z - zt, axis=1).mean())
        if self.class_guard and self.meter.paired_class_tv(feats, self.teacher).lo > 0:
            value += CLASS_MIX_PENALTY
        return value

    def __call__(self, schedule: Schedule) -> tuple[float, float]:
        """(fitness, seconds spent evaluating)."""
        t0 = time.perf_counter()
        value = self.score(self.features(schedule))
        return value, time.perf_counter() - t0
