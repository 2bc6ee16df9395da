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


def test_class_weights_restore_the_reference_mix():
    from flexdiff.metrics.fid import class_weights

    labels = np.array([0] * 30 + [1] * 10)
    shares = np.array([0.5, 0.5])
    w = class_weights(labels, shares)
    assert w.sum() == pytest.approx(len(labels))
    assert w[labels == 0].sum() == pytest.approx(w[labels == 1].sum())


def test_balanced_distance_ignores_the_class_mix_plain_fid_does_not():
    """Two classes far apart: drawing them 3:1 instead of 1:1 moves FID a lot, the balanced distance little."""
    rng = np.random.default_rng(0)
    centre = np.zeros(8)
    centre[0] = 10.0

    def draw(n0, n1):
        x = np.concatenate([rng.normal(size=(n0, 8)), rng.normal(size=(n1, 8)) + centre])
        return x, np.array([0] * n0 + [1] * n1)

    ref, _ = draw(2000, 2000)
    shares = np.array([0.5, 0.5])
    skewed, lab = draw(1500, 500)
    plain = fid_with_ci(skewed, ref, n_boot=20).value
    balanced = fid_with_ci(skewed, ref, n_boot=20, labels=lab, shares=shares).value
    assert plain > 10 * balanced
    assert balanced < 0.5


def test_headline_metric_invariants():
    """On the shipped classifier's space: identical sets score 0, noise and blur score worse, monotonically."""
    from flexdiff.data import load_digits_split
    from flexdiff.metrics import QualityMeter
    from flexdiff.metrics.study import add_noise, gaussian_blur

    meter = QualityMeter.for_model((1, 16, 16), n_boot=20)
    assert meter.headline == "cbfd"
    test, _ = load_digits_split("test")
    f = meter.features(test)
    rep = meter.report(f, f, kid=False)
    assert rep["cbfd_minus_teacher"].value == pytest.approx(0.0, abs=1e-9)
    assert rep["rfid"].value == pytest.approx(0.0, abs=1e-4)  # eigenvalue round-off in 384 dimensions
    assert rep["teacher_distance"].value == 0.0
    assert meter.quality(meter.reference) == pytest.approx(0.0, abs=1e-4)
    scores = [meter.quality(meter.features(add_noise(test, s))) for s in (0.0, 0.05, 0.1, 0.2)]
    assert scores == sorted(scores) and scores[-1] > 5 * scores[0]
    blurred = [meter.quality(meter.features(gaussian_blur(test, s))) for s in (0.5, 0.75, 1.0)]
    assert scores[0] < blurred[0] < blurred[1] < blurred[2]
    degraded = meter.report(meter.features(add_noise(test, 0.1)), f, kid=False)
    assert degraded["cbfd_minus_teacher"].lo > 0  # the paired difference resolves it


def test_prepared_reference_distance_equals_frechet_distance_even_when_singular():
    """The bench's cached reference side (a PSD square root) gives the same distance as the direct formula, also
    for covariances of fewer samples than features, where no Cholesky factor exists."""
    from flexdiff.metrics.fid import _Side

    for n_a, n_b in ((300, 300), (20, 300), (20, 25)):
        a, b = _gauss(n_a, seed=1), _gauss(n_b, seed=2) * 1.3 + 0.2
        direct = frechet_distance(*_stats(a), *_stats(b))
        assert _Side.of(*_stats(b)).distance(*_stats(a)) == pytest.approx(direct, rel=1e-6, abs=1e-8)


def test_factored_distances_equal_the_covariance_route():
    """The distances in a covariance factor's row space (bootstrap rounds with rows drawn 0 times, class weights,
    fewer and more rows than features) equal the direct formula on the same weighted covariances."""
    from flexdiff.metrics.fid import _factor, _frechet_factored, _Side

    rng = np.random.default_rng(0)
    dim = _gauss(2, seed=0).shape[1]
    for n_a, n_b in ((dim // 2, dim // 2), (dim // 2, 3 * dim), (3 * dim, 3 * dim)):
        a, b = _gauss(n_a, seed=1), _gauss(n_b, seed=2) * 1.3 + 0.2
        for w in (None, np.bincount(rng.integers(0, n_a, n_a), minlength=n_a).astype(float),
                  rng.uniform(0.2, 3.0, n_a) * (rng.uniform(size=n_a) > 0.3)):
            direct = frechet_distance(*_stats(a, w), *_stats(b))
            assert _Side.of(*_stats(b)).distance_factored(*_factor(a, w)) == pytest.approx(direct, rel=1e-6, abs=1e-8)
            assert _frechet_factored(*_factor(a, w), *_factor(b)) == pytest.approx(direct, rel=1e-6, abs=1e-8)


def test_interval_and_paired_difference_share_their_bootstrap_rounds():
    """A set's distance in each round is the same whether it feeds its own interval or a paired difference, so
    the paired difference of a set with itself is exactly 0 ± 0 and equals the difference of the two intervals'
    point values."""
    ref, x, t = _gauss(800, seed=3), _gauss(200, shift=0.2, seed=4), _gauss(200, seed=5)
    d = paired_fid_difference(x, t, ref, n_boot=30)
    assert d.value == pytest.approx(fid_with_ci(x, ref, n_boot=30).value - fid_with_ci(t, ref, n_boot=30).value)
    same = paired_fid_difference(x, x, ref, n_boot=30)
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0)
