"""Timestep similarity and its clustering into contiguous intervals (DiffPruning, step 1-2).

Two measures on a subsample of timesteps, both on the same images and noise at every timestep:
- `grad`: cosine similarity of the denoising loss's gradients w.r.t. all parameters (task
  affinity: two timesteps are alike when training on one helps the other);
- `cka`: linear CKA (Kornblith et al. 2019) of the mid-block activations.
`mean` averages them. The intervals are the contiguous partition that minimises the summed
within-interval dissimilarity (each interval's pairwise 1 - S over its size), found exactly by
dynamic programming over the cut points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import FlexdiffError
from ..fit import Objective
from ..io import save_figure, save_npz
from ..mixture import Intervals

MEASURES = ("grad", "cka", "mean")


def _linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    num = (y.T @ x).square().sum()
    return float(num / ((x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()))


def timestep_similarity(unet, images: torch.Tensor, scheduler_config: dict, timesteps: list[int],
                        seed: int = 0, progress=None) -> dict[str, np.ndarray]:
    """Similarity matrices between `timesteps` (both measures), on `images` with one fixed noise."""
    from ..anatomy import anatomy
    from ..sampling import null_conditioning

    objective = Objective(unet, scheduler_config)  # epsilon or velocity, and the model's call convention
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    null = null_conditioning(unet)  # a class-conditional model: its unconditional (null-label) denoiser
    kwargs = null.model_kwargs(len(images)) if null is not None else {}
    params = [p for p in unet.parameters()]
    was = [p.requires_grad for p in params]
    feats, grads = [], []
    captured = {}
    site, read = anatomy(unet).feature_site()
    handle = site.register_forward_hook(lambda m, a, out: captured.__setitem__("h", read(out)))
    task = progress.add_task("timestep similarity", total=len(timesteps)) if progress else None
    try:
        for p in params:
            p.requires_grad_(True)
        for t in timesteps:
            tt = torch.full((len(images),), t, dtype=torch.long)
            x_t = objective.noised(images, noise, tt)
            loss = torch.nn.functional.mse_loss(objective.predict(unet, x_t, tt, kwargs), objective.target(images, noise))
            g = torch.autograd.grad(loss, params)
            grads.append(torch.cat([x.reshape(-1) for x in g]))
            feats.append(captured["h"].detach().reshape(len(images), -1))
            if task is not None:
                progress.update(task, advance=1)
    finally:
        handle.remove()
        for p, w in zip(params, was):
            p.requires_grad_(w)
        if task is not None:
            progress.remove_task(task)
    gm = torch.nn.functional.normalize(torch.stack(grads), dim=1)
    grad_sim = (gm @ gm.T).numpy().astype(np.float64)
    m = len(timesteps)
    cka = np.ones((m, m))
    for i in range(m):
        for j in range(i + 1, m):
            cka[i, j] = cka[j, i] = _linear_cka(feats[i], feats[j])
    return {"grad": grad_sim, "cka": cka, "mean": (grad_sim + cka) / 2}


def partition_cost(sim: np.ndarray, a: int, b: int) -> float:
    """Dissimilarity inside [a, b): sum of pairwise (1 - S) divided by the interval's size."""
    block = 1.0 - sim[a:b, a:b]
    return float(block.sum() / (b - a))


def cluster(sim: np.ndarray, k: int) -> tuple[list[int], float]:
    """Optimal contiguous partition of the m timesteps into k groups: (start index of each group, cost)."""
    m = len(sim)
    if not 1 <= k <= m:
        raise FlexdiffError(f"cannot cut {m} sampled timesteps into {k} intervals; use 1 to {m}")
    cost = np.array([[partition_cost(sim, a, b) if b > a else np.inf for b in range(m + 1)] for a in range(m + 1)])
    best = np.full((k + 1, m + 1), np.inf)
    arg = np.zeros((k + 1, m + 1), dtype=int)
    best[0, 0] = 0.0
    for j in range(1, k + 1):  # best[j, b]: first b timesteps in j groups
        for b in range(j, m + 1):
            cands = best[j - 1, j - 1:b] + cost[j - 1:b, b]
            i = int(np.argmin(cands))
            best[j, b], arg[j, b] = cands[i], i + j - 1
    starts, b = [], m
    for j in range(k, 0, -1):
        a = arg[j, b]
        starts.append(a)
        b = a
    return sorted(int(a) for a in starts), float(best[k, m])


def knee(costs: list[float]) -> int:
    """The stated rule for K: the point of the cost-vs-K curve farthest below the chord from K=1 to K=max."""
    ks = np.arange(1, len(costs) + 1, dtype=float)
    c = np.asarray(costs, dtype=float)
    if len(c) < 3 or c[0] == c[-1]:
        return 1 if len(c) < 2 else int(np.argmin(c)) + 1
    chord = c[0] + (c[-1] - c[0]) * (ks - 1) / (ks[-1] - 1)
    return int(np.argmax(chord - c)) + 1


def intervals_from_similarity(sim: np.ndarray, timesteps: list[int], num_train_timesteps: int,
                              k: int | None = None, k_max: int = 6) -> Intervals:
    """Cluster, choose K by the knee rule when not given, and turn group starts into timestep starts.

    Sampled timesteps ascend; a cut between two sampled timesteps lies halfway between them.
    """
    order = np.argsort(timesteps)
    if not np.array_equal(order, np.arange(len(timesteps))):
        raise FlexdiffError("timesteps must be given in ascending order")
    k_max = min(k_max, len(timesteps))
    costs = [cluster(sim, j)[1] for j in range(1, k_max + 1)]
    chosen = k if k is not None else knee(costs)
    starts_idx, cost = cluster(sim, chosen)
    starts = [0] + [int(round((timesteps[i - 1] + timesteps[i]) / 2)) for i in starts_idx[1:]]
    meta = dict(k_rule="given" if k is not None else "knee of the within-interval cost over K=1..%d" % k_max,
                costs_by_k=costs, cost=cost, group_starts=starts_idx)
    return Intervals(tuple(starts), num_train_timesteps, meta)


def plot_similarity(mats: dict[str, np.ndarray], timesteps: list[int], intervals: Intervals, path: Path,
                    measure: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["grad", "cka", "mean"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    ticks = list(range(0, len(timesteps), max(1, len(timesteps) // 8)))
    group_starts = intervals.meta.get("group_starts", [])
    titles = {"grad": "loss-gradient cosine", "cka": "mid-block activation CKA", "mean": "mean of the two"}
    for ax, name in zip(axes, names):
        im = ax.imshow(mats[name], cmap="viridis", origin="lower")
        ax.set_title(titles[name] + (" (clustered)" if name == measure else ""))
        ax.set_xticks(ticks, [timesteps[i] for i in ticks], rotation=45)
        ax.set_yticks(ticks, [timesteps[i] for i in ticks])
        ax.set_xlabel("timestep")
        if name == measure:
            for g in group_starts[1:]:
                ax.axvline(g - 0.5, color="red", lw=1.5)
                ax.axhline(g - 0.5, color="red", lw=1.5)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Timestep similarity; red lines: the interval cuts  " +
                 "  ".join(f"[{a}, {b}]" for a, b in intervals.bounds()))
    fig.tight_layout()
    save_figure(path, fig)
    plt.close(fig)


def similarity_images(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The images the similarity is measured on: `n` drawn without replacement, fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    return images[torch.randperm(len(images), generator=g)[:n]]


def find_intervals(unet, images: torch.Tensor, scheduler_config: dict, out_dir: Path, num_timesteps: int = 20,
                   measure: str = "mean", k: int | None = None, k_max: int = 6, seed: int = 0,
                   progress=None) -> Intervals:
    """The whole step: similarity, clustering, heat map; writes intervals.json, similarity.npz/.png."""
    if measure not in MEASURES:
        raise FlexdiffError(f"--measure {measure!r}; accepted: {', '.join(MEASURES)}")
    T = int(scheduler_config.get("num_train_timesteps", 1000))
    if not 2 <= num_timesteps <= T:
        raise FlexdiffError(f"--timesteps {num_timesteps}: sample between 2 and {T} timesteps")
    if k is not None and not 1 <= k <= num_timesteps:
        raise FlexdiffError(f"--k {k}: choose 1 to {num_timesteps} intervals (the number of sampled timesteps)")
    timesteps = [int(round(x)) for x in np.linspace(0, T - 1, num_timesteps)]
    mats = timestep_similarity(unet, images, scheduler_config, timesteps, seed=seed, progress=progress)
    iv = intervals_from_similarity(mats[measure], timesteps, T, k=k, k_max=k_max)
    iv.meta.update(measure=measure, timesteps=timesteps, images=len(images), seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_npz(out_dir / "similarity.npz", timesteps=np.array(timesteps), **mats)
    plot_similarity(mats, timesteps, iv, out_dir / "similarity.png", measure)
    iv.save(out_dir / "intervals.json")
    return iv
