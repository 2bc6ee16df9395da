"""Fitness of a schedule: how far its samples are from the teacher's, on fixed evaluation noise."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import FlexdiffError
from ..io import save_safetensors
from ..metrics import QualityMeter
from ..metrics.fid import fid
from ..models import LoadedModel
from ..sampling import initial_noise, sample
from ..schedule import Schedule

METRICS = ("rfid", "distance", "fid")


class Fitness:
    """Scores schedules on one fixed set of initial noises (lower is better).

    - rfid: FID between the candidate's samples and the teacher's from the same noise
      (Flexiffusion's relative FID);
    - distance: mean per-sample feature distance to the teacher (cheaper to estimate well);
    - fid: FID against the real data (AutoDiffusion's fitness).
    The teacher's features are computed once and stored in `workdir`.
    """

    def __init__(self, model: LoadedModel, meter: QualityMeter, teacher: Schedule, metric: str,
                 samples: int, seed: int, workdir: Path, batch_size: int = 256, progress=None):
        if metric not in METRICS:
            raise FlexdiffError(f"--metric {metric!r}: accepted values are {', '.join(METRICS)}")
        self.model, self.meter, self.metric, self.batch_size = model, meter, metric, batch_size
        self.progress = progress
        c = model.unet.config
        self.noise = initial_noise(samples, (c.in_channels, c.sample_size, c.sample_size), seed)
        path = Path(workdir) / f"teacher-{teacher.num_steps}-{samples}-{seed}.safetensors"
        if path.exists():
            self.teacher = load_file(path)["features"].numpy()
        else:
            images = self._images(teacher, "teacher")
            self.teacher = meter.features(images)
            save_safetensors(path, {"features": torch.from_numpy(self.teacher)})

    def _images(self, schedule: Schedule, description: str) -> torch.Tensor:
        return sample(self.model.unet, self.model.scheduler_config, schedule, self.noise, self.batch_size,
                      progress=self.progress, description=description).images

    def features(self, schedule: Schedule) -> np.ndarray:
        return self.meter.features(self._images(schedule, schedule.describe()))

    def score(self, feats: np.ndarray, metric: str | None = None) -> float:
        """The fitness of features drawn on the evaluation noise (by this fitness's metric, or `metric`)."""
        metric = metric or self.metric
        if metric == "rfid":
            return fid(feats, self.teacher)
        if metric == "distance":
            return float(np.linalg.norm(feats - self.teacher, axis=1).mean())
        return fid(feats, self.meter.reference)

    def __call__(self, schedule: Schedule) -> tuple[float, float]:
        """(fitness, seconds spent evaluating)."""
        t0 = time.perf_counter()
        value = self.score(self.features(schedule))
        return value, time.perf_counter() - t0
