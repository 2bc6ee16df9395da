"""FID, KID, relative FID and per-sample teacher distance, with bootstrap confidence intervals.

All functions take feature matrices (N, D). FID: Heusel et al. 2017, eq. in §"FID":
||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}). KID: Binkowski et al. 2018, unbiased MMD^2
with the kernel k(x, y) = (x.y / D + 1)^3.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A value and its (lo, hi) confidence interval."""

    value: float
    lo: float
    hi: float

    def fmt(self, digits: int = 2) -> str:
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    def to_dict(self) -> dict:
        return dict(value=self.value, lo=self.lo, hi=self.hi)


def _stats(x: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance; `w` = how often each row is drawn (bootstrap counts)."""
    if w is None:
        return x.mean(0), np.cov(x, rowvar=False)
    n = w.sum()
    mu = (w[:, None] * x).sum(0) / n
    xc = x - mu
    return mu, (xc * w[:, None]).T @ xc / (n - 1)


def _factor(x: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and a factor A of the (unbiased, weighted) covariance, cov = A^T A: the centred rows scaled by
    sqrt(weight / (n - 1)), rows of weight 0 left out. A bootstrap round draws about 63% of the rows, so A has
    fewer rows than features on a few hundred samples, and the distances below work in that smaller space."""
    if w is None:
        mu = x.mean(0)
        return mu, (x - mu) / np.sqrt(len(x) - 1)
    n = w.sum()
    mu = (w[:, None] * x).sum(0) / n
    keep = w > 0
    return mu, (x[keep] - mu) * np.sqrt(w[keep] / (n - 1))[:, None]


def _sum_sqrt_eigvals(m: np.ndarray) -> float:
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def _frechet_factored(mu1: np.ndarray, a1: np.ndarray, mu2: np.ndarray, a2: np.ndarray) -> float:
    """The Fréchet distance of two sets given as (mean, covariance factor). Tr((S1 S2)^1/2) is the sum of the
    singular values of A1 A2^T (the eigenvalues of S1 S2 are those of A1 A2^T A2 A1^T), a problem of the size of
    the smaller row count; with more rows than features, the covariances' own route (`frechet_distance`)."""
    _check_finite(mu1, a1, mu2, a2)
    if max(len(a1), len(a2)) > a1.shape[1]:
        return frechet_distance(mu1, a1.T @ a1, mu2, a2.T @ a2)
    diff = mu1 - mu2
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * nuclear)


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((S1^1/2 S2 S1^1/2)^1/2) = the sum of sqrt(eigenvalues of S1 S2).

    With a Cholesky factor S = L L^T of either matrix, L^T S' L is symmetric with those same
    eigenvalues: one Cholesky and one symmetric eigenvalue solve, several times cheaper than the
    matrix square root (this runs hundreds of times per bootstrap). Both singular (fewer samples
    than features): the square root through an eigendecomposition.
    """
    for a, b in ((s2, s1), (s1, s2)):
        try:
            chol = np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            continue
        m = chol.T @ b @ chol
        return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    ev1, v1 = np.linalg.eigh(s1)
    s1_half = (v1 * np.sqrt(np.clip(ev1, 0, None))) @ v1.T
    m = s1_half @ s2 @ s1_half
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def _check_finite(*arrays) -> None:
    if not all(np.isfinite(a).all() for a in arrays):  # the solvers would fail with a LinAlgError
        from ..errors import FlexdiffError

        raise FlexdiffError("the samples' features are not finite (the samples overflow the feature network); "
                            "no Frechet distance can be measured")


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """||mu1-mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2)."""
    _check_finite(mu1, s1, mu2, s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2))


@dataclass(frozen=True)
class _Side:
    """One set's statistics prepared for many distances to it: mean, covariance and its trace, and (made when first
    needed) the covariance's symmetric PSD square root, through an eigendecomposition, so a singular covariance is
    fine."""

    mu: np.ndarray
    cov: np.ndarray
    trace: float

    @classmethod
    def of(cls, mu: np.ndarray, cov: np.ndarray) -> "_Side":
        _check_finite(mu, cov)
        return cls(mu, (cov + cov.T) / 2, float(np.trace(cov)))

    @functools.cached_property
    def root(self) -> np.ndarray:
        ev, v = np.linalg.eigh(self.cov)
        return (v * np.sqrt(np.clip(ev, 0, None))) @ v.T

    def distance(self, mu: np.ndarray, cov: np.ndarray) -> float:
        """The Fréchet distance of (mu, cov) to this set: Tr((R S R)^1/2) with R = this set's root has the
        eigenvalues of S1 S2, so it is the same distance as `frechet_distance`, with no factorisation of S."""
        _check_finite(mu, cov)
        diff = mu - self.mu
        return float(diff @ diff + np.trace(cov) + self.trace - 2 * _sum_sqrt_eigvals(self.root @ cov @ self.root))

    def distance_factored(self, mu: np.ndarray, a: np.ndarray) -> float:
        """The same distance for a set given as (mean, covariance factor A): Tr((A S A^T)^1/2) with this set's S has
        the same eigenvalues again, in A's row count; with more rows than features, `distance`."""
        if len(a) > a.shape[1]:
            return self.distance(mu, a.T @ a)
        _check_finite(mu, a)
        diff = mu - self.mu
        return float(diff @ diff + (a * a).sum() + self.trace - 2 * _sum_sqrt_eigvals(a @ self.cov @ a.T))


_REFERENCE_ROUNDS: dict[tuple, list[_Side]] = {}
_MAX_REFERENCES = 4  # one bench scores against two views of one reference (standardised, penultimate)


def _reference_rounds(ref: np.ndarray, n_boot: int, seed: int) -> list[_Side]:
    """The reference's statistics unresampled (index 0) and in each of `n_boot` bootstrap rounds (1..n_boot),
    computed once per process and reused by every method scored against it.

    The reference's rounds draw from their own stream (seeded by `seed` and the reference's size), apart from the
    samples' rounds: every method then meets the same reference resamples, and the bench's dozens of rows
    factorise the reference's covariances once instead of once per row and metric."""
    import hashlib

    ref = np.ascontiguousarray(ref, dtype=np.float64)
    key = (hashlib.blake2b(ref.tobytes(), digest_size=16).hexdigest(), ref.shape, n_boot, seed)
    if key not in _REFERENCE_ROUNDS:
        rng = np.random.default_rng([seed, len(ref), 1])
        rounds = [_Side.of(*_stats(ref))] + [_Side.of(*_stats(ref, _counts(rng, len(ref)))) for _ in range(n_boot)]
        while len(_REFERENCE_ROUNDS) >= _MAX_REFERENCES:
            _REFERENCE_ROUNDS.pop(next(iter(_REFERENCE_ROUNDS)))
        _REFERENCE_ROUNDS[key] = rounds
    return _REFERENCE_ROUNDS[key]


def fid(x: np.ndarray, y: np.ndarray) -> float:
    return _frechet_factored(*_factor(x), *_factor(y))


def _counts(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)


def _interval(value: float, boots: list[float], level: float) -> Estimate:
    """Normal interval from the bootstrap standard error, centred on the estimate.

    Not the percentile interval: resampling with replacement adds duplicates, which raises
    FID's small-sample bias, so bootstrap FIDs sit above the estimate and a percentile
    interval can miss it entirely. Their spread still measures the standard error well.
    """
    from scipy.stats import norm

    half = norm.ppf(1 - (1 - level) / 2) * float(np.std(boots, ddof=1))
    return Estimate(float(value), float(value - half), float(value + half))


def class_weights(labels: np.ndarray, shares: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Row weights that give each class the share it has in the reference (class balancing).

    `counts`: how often each row is drawn (a bootstrap round); the weights keep their total, so
    the covariance's n - 1 stays that of the sample. A class the samples lack cannot be restored:
    the class histogram term reports it.
    """
    counts = np.ones(len(labels)) if counts is None else counts
    per_class = np.bincount(labels, weights=counts, minlength=len(shares))
    w = counts * shares[labels] / np.maximum(per_class[labels], 1e-12)
    if w.sum() <= 0:  # every sample fell in a class the reference lacks: nothing to rebalance to
        return counts
    return w * counts.sum() / w.sum()


def _weights(labels, shares, counts):
    return counts if labels is None else class_weights(labels, shares, counts)


_DISTANCES: dict[tuple, np.ndarray] = {}
_MAX_DISTANCES = 512


def _distances(x: np.ndarray, ref: np.ndarray, n_boot: int, seed: int, labels: np.ndarray | None,
               shares: np.ndarray | None) -> np.ndarray:
    """[FD(x, ref), then FD in each of the `n_boot` bootstrap rounds], memoised.

    Round i resamples x with the i-th draw of `default_rng(seed)` and the reference with its own i-th round, so a
    set's distances are the same whether they feed its interval or a paired difference: scoring a method against
    the teacher reuses both sides' distances instead of computing them again."""
    import hashlib

    def digest(a):
        return None if a is None else hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()

    key = (digest(x), x.shape, digest(ref), ref.shape, n_boot, seed, digest(labels), digest(shares))
    if key not in _DISTANCES:
        rng = np.random.default_rng(seed)
        refs = _reference_rounds(ref, n_boot, seed)
        out = [refs[0].distance_factored(*_factor(x, _weights(labels, shares, None)))]
        out += [refs[i].distance_factored(*_factor(x, _weights(labels, shares, _counts(rng, len(x)))))
                for i in range(1, n_boot + 1)]
        while len(_DISTANCES) >= _MAX_DISTANCES:
            _DISTANCES.pop(next(iter(_DISTANCES)))
        _DISTANCES[key] = np.array(out)
    return _DISTANCES[key]


def fid_with_ci(x: np.ndarray, ref: np.ndarray, n_boot: int = 200, level: float = 0.95, seed: int = 0,
                labels: np.ndarray | None = None, shares: np.ndarray | None = None) -> Estimate:
    """Fréchet distance of samples `x` to reference `ref`; bootstrap over both sets (normal interval).

    With `labels` (each sample's predicted class) and `shares` (the reference's class shares), the
    class-balanced distance: samples are reweighted to the reference's class mix, so that how
    many samples fell in each class (multinomial noise, and a separate question) does not move it.
    """
    d = _distances(x, ref, n_boot, seed, labels, shares)
    return _interval(d[0], list(d[1:]), level)


def paired_fid_difference(x: np.ndarray, teacher: np.ndarray, ref: np.ndarray, n_boot: int = 200,
                          level: float = 0.95, seed: int = 0, labels: np.ndarray | None = None,
                          teacher_labels: np.ndarray | None = None, shares: np.ndarray | None = None) -> Estimate:
    """FD(x, ref) - FD(teacher, ref) where row i of `x` and `teacher` share initial noise.

    Both sets are resampled with the same indices in each bootstrap round (and meet the same reference
    resample), so the noise they share cancels: the interval is far narrower than that of two independent FIDs.
    With labels and shares, both distances are class-balanced (see `fid_with_ci`).
    """
    if len(x) != len(teacher):
        raise ValueError("paired samples need equal counts")
    d = (_distances(x, ref, n_boot, seed, labels, shares)
         - _distances(teacher, ref, n_boot, seed, teacher_labels, shares))
    return _interval(d[0], list(d[1:]), level)


def class_histogram_tv(labels: np.ndarray, shares: np.ndarray, n_boot: int = 200, level: float = 0.95,
                       seed: int = 0) -> Estimate:
    """Total variation between the samples' class histogram and the reference's shares (0: same mix)."""
    rng = np.random.default_rng(seed)
    boots = [_class_tv(labels[rng.integers(0, len(labels), len(labels))], shares) for _ in range(n_boot)]
    return _interval(_class_tv(labels, shares), boots, level)


def _class_tv(labels: np.ndarray, shares: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.bincount(labels, minlength=len(shares)) / len(labels) - shares).sum())


def paired_class_tv_difference(labels: np.ndarray, other: np.ndarray, shares: np.ndarray, n_boot: int = 200,
                               level: float = 0.95, seed: int = 0) -> Estimate:
    """TV(labels) − TV(other) against the reference's class shares, paired: both label sets come from the same
    noise, in the same order, and each bootstrap draw resamples the same indices of both (negative: `labels`
    has the closer class mix)."""
    if len(labels) != len(other):
        raise ValueError(f"paired class mixes need the same noise: {len(labels)} vs {len(other)} samples")
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        boots.append(_class_tv(labels[idx], shares) - _class_tv(other[idx], shares))
    return _interval(_class_tv(labels, shares) - _class_tv(other, shares), boots, level)


def relative_fid(x: np.ndarray, teacher: np.ndarray, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> Estimate:
    """rFID: FID between a method's samples and the teacher's samples from the same noise (Flexiffusion)."""
    rng = np.random.default_rng(seed)
    value = fid(x, teacher)
    boots = []
    for _ in range(n_boot):
        w = _counts(rng, len(x))
        boots.append(_frechet_factored(*_factor(x, w), *_factor(teacher, w)))
    return _interval(value, boots, level)


def teacher_distance(x: np.ndarray, teacher: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean per-sample feature distance ||f(x_i) - f(teacher_i)|| over shared-noise pairs."""
    d = np.linalg.norm(x - teacher, axis=1)
    rng = np.random.default_rng(seed)
    boots = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(n_boot)]
    return _interval(float(d.mean()), boots, level)


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    n, m = len(kxx), len(kyy)
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def kid_with_ci(x: np.ndarray, ref: np.ndarray, n_boot: int = 50, level: float = 0.95, seed: int = 0) -> Estimate:
    """KID (unbiased, cubic kernel) on all samples, with a half-sampling interval.

    Features are first standardised by the reference set's mean and overall standard
    deviation: the cubic kernel expects x.y / D of order one (Inception features are), and raw
    classifier features would put it in the hundreds. The interval: each round draws half of
    each set without replacement (resampling with replacement breaks the unbiased estimator,
    since duplicates look like perfect matches); for half of a finite set, the spread of such
    estimates approximates the standard error of the full-set estimate.
    """
    mu, scale = ref.mean(0), ref.std(0).mean()
    x, ref = (x - mu) / scale, (ref - mu) / scale
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(ref, ref), _poly_kernel(x, ref)
    value = _mmd2_unbiased(kxx, kyy, kxy)
    rng = np.random.default_rng(seed)
    subs = []
    for _ in range(n_boot):
        i = rng.choice(len(x), len(x) // 2, replace=False)
        j = rng.choice(len(ref), len(ref) // 2, replace=False)
        subs.append(_mmd2_unbiased(kxx[np.ix_(i, i)], kyy[np.ix_(j, j)], kxy[np.ix_(i, j)]))
    return _interval(value, subs, level)
