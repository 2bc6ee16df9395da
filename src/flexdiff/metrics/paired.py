"""Quality relative to the teacher with no real data: each sample's decoded image against the
teacher's image from the same noise and prompt. PSNR and SSIM (torchmetrics) and the RMSE per
pair, averaged, with a bootstrap interval over the pairs. And `PixelMeter`, the search's
feature space for any model: the decoded image itself, pooled to at most 32x32.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FlexdiffError
from .fid import Estimate, _interval

PSNR_CAP = 100.0  # dB: identical images would score infinity


def mean_interval(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """The mean of per-sample values with its bootstrap interval."""
    return _mean_ci(np.asarray(values, dtype=float), n_boot, level, seed)


def _mean_ci(values: np.ndarray, n_boot: int, level: float, seed: int) -> Estimate:
    rng = np.random.default_rng(seed)
    boots = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(n_boot)]
    return _interval(float(values.mean()), boots, level)


@torch.no_grad()
def per_pair(images: torch.Tensor, teacher: torch.Tensor) -> dict[str, np.ndarray]:
    """PSNR (dB), SSIM and RMSE of every (sample, teacher) pair; images in [-1, 1], same order."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if images.shape != teacher.shape:
        raise FlexdiffError(f"paired metrics need the same shapes: {tuple(images.shape)} vs {tuple(teacher.shape)}")
    a, b = images.float().clamp(-1, 1), teacher.float().clamp(-1, 1)
    psnr = peak_signal_noise_ratio(a, b, data_range=2.0, reduction="none", dim=(1, 2, 3))
    kernel = min(11, a.shape[-1] - (1 - a.shape[-1] % 2))  # odd and no larger than the image
    ssim = structural_similarity_index_measure(a, b, data_range=2.0, reduction="none", kernel_size=kernel)
    rmse = (a - b).pow(2).flatten(1).mean(1).sqrt()
    return dict(psnr=psnr.clamp(max=PSNR_CAP).numpy(), ssim=ssim.numpy(), rmse=rmse.numpy())


def paired_report(images: torch.Tensor, teacher: torch.Tensor, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> dict[str, Estimate]:
    """Mean PSNR / SSIM (higher: closer to the teacher) and RMSE (lower), each with its interval."""
    return {f"teacher {k}": _mean_ci(v, n_boot, level, seed) for k, v in per_pair(images, teacher).items()}


class PixelMeter:
    """Features for a search on any model without real data: the decoded image, average-pooled to at
    most 32x32 and flattened. Only the per-sample distance to the teacher is defined here."""

    name = "pixels"
    headline = "distance"
    classify = None

    def __init__(self, image_shape: tuple[int, int, int]):
        c, h, w = image_shape
        self.size = min(32, h)
        self.feature_dim = c * self.size * self.size

    def features(self, images: torch.Tensor) -> np.ndarray:
        x = images.float()
        if x.shape[-1] != self.size:
            x = F.adaptive_avg_pool2d(x, self.size)
        return x.flatten(1).numpy()

    def standardised(self, feats: np.ndarray) -> np.ndarray:
        return feats

    def quality(self, feats: np.ndarray) -> float:
        raise FlexdiffError("--metric fid needs real images to compare against (--real-data DIR) or the digits "
                            "model; without them use --metric distance (to the teacher)")
