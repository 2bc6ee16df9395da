"""Quality of samples: features from a fixed network, then FID / KID / rFID with intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import FlexdiffError
from .fid import (
    Estimate,
    _reference_rounds,
    _stats,
    class_histogram_tv,
    class_weights,
    fid_with_ci,
    kid_with_ci,
    paired_class_tv_difference,
    paired_fid_difference,
    relative_fid,
    teacher_distance,
)

__all__ = ["Estimate", "QualityMeter", "meter_for", "verdict"]


def verdict(difference: Estimate | dict, class_tv_difference: Estimate | dict | None = None) -> str:
    """The rule for "A beats B" (docs/metrics.md): A − B in the headline is separated below 0 *and* A's class
    mix is not separated worse (A − B in class TV has its interval reaching 0 or below). Both paired on the
    same noise. 'better', 'worse' (the headline separated above 0), 'tie' (neither separated), or 'better
    headline, worse class mix' (the win the rule refuses)."""
    def lo_hi(e):
        return (e["lo"], e["hi"]) if isinstance(e, dict) else (e.lo, e.hi)

    lo, hi = lo_hi(difference)
    tv_worse = class_tv_difference is not None and lo_hi(class_tv_difference)[0] > 0
    if hi < 0:
        return "better headline, worse class mix" if tv_worse else "better"
    return "worse" if lo > 0 else "tie"


def meter_for(model, inception_weights: Path | None = None, real_data: Path | None = None):
    """The feature space to score a model's samples in: the digits classifier, or Inception against
    --real-data; for any other model without real data, its decoded images (teacher-relative only)."""
    from ..data import DIGITS_RESOLUTION
    from .paired import PixelMeter

    shape = model.image_shape
    if real_data is None and (shape[0], shape[1]) != (1, DIGITS_RESOLUTION):
        if inception_weights is not None:  # not ignored silently: teacher-relative Inception rFID is not built
            raise FlexdiffError("--inception-weights scores against real images: give --real-data DIR too (without "
                                "real data this model is measured against the teacher: PSNR, SSIM)")
        return PixelMeter(shape)
    return QualityMeter.for_model(shape, inception_weights, real_data)


MIN_REAL_IMAGES = 50  # fewer real images than this make no meaningful reference


class QualityMeter:
    """Turns images into features and features into metrics against a real reference set.

    With a `classify` function (the digits space) the headline is the class-balanced Fréchet
    distance `cbfd` on standardised features, beside the class-histogram distance `class_tv`;
    `fid`/`kid` are then computed on the `fid_columns` (the classic penultimate features). Without
    one (Inception) the headline is `fid`. Paired metrics against the teacher use the headline's
    space. Why: docs/metrics.md.
    """

    def __init__(self, featurize: Callable[[torch.Tensor], np.ndarray], reference: torch.Tensor,
                 name: str, n_boot: int = 200, classify: Callable[[np.ndarray], np.ndarray] | None = None,
                 fid_columns: slice | None = None):
        self.featurize, self.name, self.n_boot = featurize, name, n_boot
        self.classify, self.fid_columns = classify, fid_columns or slice(None)
        self.reference = featurize(reference)
        self._mu = self.reference.mean(0)
        self._sd = self.reference.std(0) + 1e-8
        self.shares = None  # the reference's class shares, with a classifier
        if classify is not None:
            labels = classify(self.reference)
            # every class the classifier can name (a sample may fall in one the reference lacks)
            classes = max(int(labels.max()) + 1, int(getattr(classify, "num_classes", 0) or 0), 10)
            self.shares = np.bincount(labels, minlength=classes) / len(labels)

    @property
    def feature_dim(self) -> int:
        return int(self.reference.shape[1])

    @property
    def headline(self) -> str:
        """The metric that ranks: lower is better."""
        return "cbfd" if self.classify is not None else "fid"

    @classmethod
    def for_model(cls, image_shape: tuple[int, ...], inception_weights: Path | None = None,
                  real_data: Path | None = None, n_boot: int = 200) -> "QualityMeter":
        """The digits classifier space for digits-shaped models; Inception when weights are given.

        The digits reference is the training split (the default model's data); the held-out
        test split is the floor of docs/metrics.md.
        """
        from ..data import DIGITS_RESOLUTION, load_digits_split, load_image_folder

        c, h, _ = image_shape
        if real_data is not None:
            reference = load_image_folder(real_data, h, channels=c, option="--real-data")
            if len(reference) < MIN_REAL_IMAGES:
                raise FlexdiffError(f"--real-data {real_data}: {len(reference)} images; a Fréchet distance to real data "
                                    f"needs at least {MIN_REAL_IMAGES} (a few hundred for a stable one)")
        elif (c, h) == (1, DIGITS_RESOLUTION):
            reference, _ = load_digits_split("train")
        else:
            raise FlexdiffError(
                f"the model makes {c}x{h}x{h} images: pass --real-data DIR (real images to compare "
                "against) for anything other than 16x16 grayscale digits"
            )
        if inception_weights is not None:
            from .inception import InceptionFeatures

            return cls(InceptionFeatures(inception_weights), reference, "inception", n_boot)
        if (c, h) != (1, DIGITS_RESOLUTION):
            raise FlexdiffError(
                f"the default feature space is a digits classifier (1x16x16); for {c}x{h}x{h} images "
                "pass --inception-weights FILE"
            )
        from .classifier import PENULTIMATE, classifier_statistics, classify_statistics, load_classifier

        clf = load_classifier()
        return cls(lambda x: classifier_statistics(clf, x).numpy(), reference, "digits-classifier", n_boot,
                   classify=lambda f: classify_statistics(clf, f), fid_columns=PENULTIMATE)

    @classmethod
    def for_loaded(cls, model, inception_weights: Path | None = None, real_data: Path | None = None) -> "QualityMeter":
        """`for_model` with the image shape read from a loaded model's config."""
        from ..anatomy import noise_shape

        return cls.for_model(noise_shape(model.unet), inception_weights, real_data)

    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.featurize(images)

    def standardised(self, feats: np.ndarray) -> np.ndarray:
        """Features in units of the reference's per-feature spread (the headline's space)."""
        return (feats - self._mu) / self._sd if self.classify is not None else feats

    def labels(self, feats: np.ndarray) -> np.ndarray | None:
        """Each sample's predicted class (None without a classifier: no class balancing)."""
        return self.classify(feats) if self.classify is not None else None

    def quality(self, feats: np.ndarray) -> float:
        """The headline metric's point value (no interval): for search fitness."""
        labels = self.labels(feats)
        w = class_weights(labels, self.shares) if labels is not None else None
        return _reference_rounds(self.standardised(self.reference), 0, 0)[0].distance(*_stats(self.standardised(feats), w))

    def report(self, feats: np.ndarray, teacher: np.ndarray | None = None, kid: bool = True) -> dict[str, Estimate]:
        """The headline and FID/KID against the real data; with the teacher's features (same noise,
        same order), also the paired differences to the teacher, rFID and the per-sample distance."""
        if len(feats) < 2:
            raise FlexdiffError("need at least 2 samples to measure quality")
        cols = self.fid_columns
        out = {}
        z, zref = self.standardised(feats), self.standardised(self.reference)
        if self.classify is not None:
            labels = self.labels(feats)
            out["cbfd"] = fid_with_ci(z, zref, self.n_boot, labels=labels, shares=self.shares)
            out["class_tv"] = class_histogram_tv(labels, self.shares, self.n_boot)
            from .manifold import precision_recall  # diversity, which cbFD and class TV do not see

            out["precision"], out["recall"] = precision_recall(z, zref)
        out["fid"] = fid_with_ci(feats[:, cols], self.reference[:, cols], self.n_boot)
        if kid:
            out["kid"] = kid_with_ci(feats[:, cols], self.reference[:, cols])
        if teacher is not None:
            zt = self.standardised(teacher)
            if self.classify is not None:
                out["cbfd_minus_teacher"] = self.paired(feats, teacher)
                out["class_tv_minus_teacher"] = self.paired_class_tv(feats, teacher)
            out["fid_minus_teacher"] = paired_fid_difference(feats[:, cols], teacher[:, cols],
                                                             self.reference[:, cols], self.n_boot)
            out["rfid"] = relative_fid(z, zt, self.n_boot)
            out["teacher_distance"] = teacher_distance(z, zt)
        return out

    def paired(self, feats: np.ndarray, other: np.ndarray) -> Estimate:
        """Headline(feats) - headline(other), paired on shared noise (negative: `feats` is better)."""
        z, zo, zref = self.standardised(feats), self.standardised(other), self.standardised(self.reference)
        return paired_fid_difference(z, zo, zref, self.n_boot, labels=self.labels(feats),
                                     teacher_labels=self.labels(other), shares=self.shares)

    def paired_class_tv(self, feats: np.ndarray, other: np.ndarray) -> Estimate | None:
        """class TV(feats) − class TV(other), paired on shared noise; None without a classifier."""
        if self.classify is None:
            return None
        return paired_class_tv_difference(self.labels(feats), self.labels(other), self.shares, self.n_boot)
