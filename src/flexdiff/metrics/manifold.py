"""Improved precision and recall (Kynkäänniemi et al. 2019): how much of the samples lies on the real data's
manifold (precision: fidelity) and how much of the real data the samples' manifold covers (recall: diversity),
each manifold the union of balls reaching every point's k-th nearest neighbour.

A schedule that collapses onto fewer shapes keeps its precision and loses recall, which a Fréchet distance
mixes with everything else. The intervals bootstrap the per-point indicators with the manifolds held fixed:
the spread from which samples (precision) and which real points (recall) were drawn, not from the radii.
"""

from __future__ import annotations

import numpy as np
import torch

from .fid import Estimate
from .paired import mean_interval

K = 3  # the paper's choice


def _radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest neighbour within the set (itself excluded)."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 0 to itself is the first


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """For each point: whether it lies inside some centre's ball."""
    out = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i:i + chunk], centres)
        out.append((d <= radii[None, :]).any(1))
    return torch.cat(out).numpy().astype(float)


def precision_recall(samples: np.ndarray, reference: np.ndarray, k: int = K, n_boot: int = 1000,
                     seed: int = 0) -> tuple[Estimate, Estimate]:
    """(precision, recall) of `samples` against `reference`, both (N, D) in the same feature space; needs more
    than k points in each. Recall depends on the sample count: compare methods at equal counts."""
    if min(len(samples), len(reference)) <= k:
        raise ValueError(f"precision and recall need more than k={k} points in each set")
    x = torch.as_tensor(np.asarray(samples), dtype=torch.float64)
    r = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    precision = _covered(x, r, _radii(r, k))
    recall = _covered(r, x, _radii(x, k))
    return mean_interval(precision, n_boot, seed=seed), mean_interval(recall, n_boot, seed=seed)
