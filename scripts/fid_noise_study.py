"""How noisy is FID in the digits feature space, and do the intervals flexdiff reports match it?

Draws several independent sample sets of one sampler on the shipped default model and compares
the spread of FID across them with the bootstrap and jackknife standard errors of one set.

    .venv/bin/python scripts/fid_noise_study.py --sets 6 --samples 1000 --steps 20
"""

from __future__ import annotations

import argparse

import numpy as np

from flexdiff.data import load_digits_split
from flexdiff.metrics.classifier import classifier_features, load_classifier
from flexdiff.metrics.fid import _stats, fid, fid_with_ci, frechet_distance
from flexdiff.models import load_model
from flexdiff.sampling import initial_noise, sample
from flexdiff.schedule import Schedule


def jackknife_se(x: np.ndarray, ref_stats, groups: int = 50) -> float:
    """Delete-a-group jackknife standard error of FID(x, fixed reference)."""
    g = np.random.default_rng(1).permutation(len(x)) % groups
    th = np.array([frechet_distance(*_stats(x[g != k]), *ref_stats) for k in range(groups)])
    return float(np.sqrt((groups - 1) / groups * ((th - th.mean()) ** 2).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, default=6)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    args = ap.parse_args()

    model, clf = load_model(), load_classifier()
    real, _ = load_digits_split("all")
    fr = classifier_features(clf, real).numpy()
    ref_stats = _stats(fr)
    values, boot_se, jack_se = [], [], []
    for s in range(args.sets):
        imgs = sample(model.unet, model.scheduler_config, Schedule.full("ddim", args.steps),
                      initial_noise(args.samples, (1, 16, 16), seed=1000 + s)).images
        fg = classifier_features(clf, imgs).numpy()
        values.append(fid(fg, fr))
        e = fid_with_ci(fg, fr, n_boot=200)
        boot_se.append((e.hi - e.lo) / (2 * 1.96))
        jack_se.append(jackknife_se(fg, ref_stats))
        print(f"set {s}: FID {values[-1]:.1f}  bootstrap SE {boot_se[-1]:.1f}  jackknife SE (generated side) {jack_se[-1]:.1f}")
    idx = np.random.default_rng(0).permutation(len(fr))
    half = len(fr) // 2
    print(f"\nDDIM-{args.steps}, {args.samples} samples per set, {args.sets} sets")
    print(f"FID across independent sets: mean {np.mean(values):.1f}, std {np.std(values, ddof=1):.1f}")
    print(f"mean bootstrap SE (both sides resampled) {np.mean(boot_se):.1f}; "
          f"mean jackknife SE (generated side only) {np.mean(jack_se):.1f}")
    print(f"real vs real ({half} vs {len(fr) - half} digits): FID {fid(fr[idx[:half]], fr[idx[half:]]):.1f}")


if __name__ == "__main__":
    main()
