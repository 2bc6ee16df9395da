import numpy as np
import pytest
import scipy.linalg
import torch

from flexdiff.metrics.classifier import DigitsClassifier, classifier_features
from flexdiff.metrics.fid import (
    _stats,
    fid,
    fid_with_ci,
    frechet_distance,
    kid_with_ci,
    paired_fid_difference,
    relative_fid,
    teacher_distance,
)


def _gauss(n, d=16, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_frechet_distance_matches_scipy_sqrtm():
    a, b = _gauss(300, seed=1), _gauss(300, seed=2) * 1.3 + 0.2
    m1, s1 = _stats(a)
    m2, s2 = _stats(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-6)


def test_fid_zero_on_identical_sets_and_grows_with_shift():
    a = _gauss(500)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid(a + 0.1, a) < fid(a + 0.5, a) < fid(a + 1.0, a)
    assert fid(a + 0.5, a) == pytest.approx(16 * 0.25, rel=1e-6)  # mean shift only


def test_fid_interval_contains_estimate_and_narrows_with_samples():
    ref = _gauss(2000, seed=9)
    small = fid_with_ci(_gauss(200, shift=0.3, seed=1), ref, n_boot=100)
    large = fid_with_ci(_gauss(2000, shift=0.3, seed=1), ref, n_boot=100)
    for e in (small, large):
        assert e.lo < e.value < e.hi
    assert (large.hi - large.lo) < (small.hi - small.lo)


def test_paired_difference_cancels_shared_noise():
    ref = _gauss(1500, seed=3)
    teacher = _gauss(400, seed=4)
    assert paired_fid_difference(teacher, teacher, ref, n_boot=50).value == 0.0
    near = teacher + np.random.default_rng(5).normal(scale=0.05, size=teacher.shape)
    paired = paired_fid_difference(near, teacher, ref, n_boot=100)
    independent = fid_with_ci(near, ref, n_boot=100)
    assert (paired.hi - paired.lo) < 0.5 * (independent.hi - independent.lo)


def test_relative_fid_and_teacher_distance():
    t = _gauss(400, seed=6)
    assert relative_fid(t, t, n_boot=20).value == pytest.approx(0.0, abs=1e-6)
    assert teacher_distance(t, t).value == 0.0
    assert relative_fid(t + 0.2, t, n_boot=20).value < relative_fid(t + 0.6, t, n_boot=20).value
    d = teacher_distance(t + 0.1, t)
    assert d.value == pytest.approx(0.1 * 4, rel=1e-6)  # ||0.1 * ones(16)|| = 0.4


def test_kid_near_zero_for_same_distribution_positive_for_shift():
    ref = _gauss(800, seed=7)
    same = kid_with_ci(_gauss(400, seed=8), ref, n_boot=20)
    shifted = kid_with_ci(_gauss(400, shift=0.5, seed=8), ref, n_boot=20)
    assert same.lo < 0 < same.hi
    assert shifted.lo > 0


def test_classifier_features_are_penultimate_and_pre_relu():
    torch.manual_seed(0)
    model = DigitsClassifier().eval()
    x = torch.rand(10, 1, 16, 16) * 2 - 1
    f = classifier_features(model, x)
    assert f.shape == (10, 64) and f.dtype == torch.float64
    assert (f < 0).any()  # taken before the ReLU
    logits = model.head(torch.relu(f.float()))
    assert torch.allclose(logits, model(x), atol=1e-5)
