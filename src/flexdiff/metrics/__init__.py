"""Quality of samples: features from a fixed network, then FID / KID / rFID with intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import FlexdiffError
from .fid import (
    Estimate,
    fid_with_ci,
    kid_with_ci,
    paired_fid_difference,
    relative_fid,
    teacher_distance,
)

__all__ = ["Estimate", "QualityMeter"]


class QualityMeter:
    """Turns images into features and features into metrics against a real reference set."""

    def __init__(self, featurize: Callable[[torch.Tensor], np.ndarray], reference: torch.Tensor,
                 name: str, n_boot: int = 200):
        self.featurize, self.name, self.n_boot = featurize, name, n_boot
        self.reference = featurize(reference)

    @classmethod
    def for_model(cls, image_shape: tuple[int, ...], inception_weights: Path | None = None,
                  real_data: Path | None = None, n_boot: int = 200) -> "QualityMeter":
        """The digits classifier space for digits-shaped models; Inception when weights are given."""
        from ..data import DIGITS_RESOLUTION, load_digits_split, load_image_folder

        c, h, _ = image_shape
        if real_data is not None:
            reference = load_image_folder(real_data, h, channels=c)
        elif (c, h) == (1, DIGITS_RESOLUTION):
            reference, _ = load_digits_split("all")
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
        from .classifier import classifier_features, load_classifier

        clf = load_classifier()
        return cls(lambda x: classifier_features(clf, x).numpy(), reference, "digits-classifier", n_boot)

    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.featurize(images)

    def report(self, feats: np.ndarray, teacher: np.ndarray | None = None, kid: bool = True) -> dict[str, Estimate]:
        """FID and KID against the real data; with the teacher's features (same noise, same order),
        also the FID difference to the teacher (paired), rFID and the per-sample distance."""
        if len(feats) < 2:
            raise FlexdiffError("need at least 2 samples to measure quality")
        out = {"fid": fid_with_ci(feats, self.reference, self.n_boot)}
        if kid:
            out["kid"] = kid_with_ci(feats, self.reference)
        if teacher is not None:
            out["fid_minus_teacher"] = paired_fid_difference(feats, teacher, self.reference, self.n_boot)
            out["rfid"] = relative_fid(feats, teacher, self.n_boot)
            out["teacher_distance"] = teacher_distance(feats, teacher)
        return out
