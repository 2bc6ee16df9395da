"""Timestep similarity and intervals: exact DP clustering, the knee rule, JSON round trip, bad input."""

import itertools

import numpy as np
import pytest
import torch

from conftest import tiny_unet
from flexdiff.errors import FlexdiffError
from flexdiff.experts.intervals import (
    Intervals,
    cluster,
    find_intervals,
    intervals_from_similarity,
    knee,
    partition_cost,
)


def _block_matrix(sizes, inside=0.9, outside=0.1, seed=0):
    rng = np.random.default_rng(seed)
    m = sum(sizes)
    s = np.full((m, m), outside)
    a = 0
    for n in sizes:
        s[a:a + n, a:a + n] = inside
        a += n
    noise = rng.normal(0, 0.02, (m, m))
    s = s + (noise + noise.T) / 2
    np.fill_diagonal(s, 1.0)
    return s


def test_dp_finds_the_best_contiguous_partition():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 9))
    sim = (x + x.T) / 8
    np.fill_diagonal(sim, 1)
    for k in (2, 3):
        starts, cost = cluster(sim, k)
        brute = min(
            (sum(partition_cost(sim, a, b) for a, b in zip((0,) + cuts, cuts + (9,))), (0,) + cuts)
            for cuts in itertools.combinations(range(1, 9), k - 1)
        )
        assert cost == pytest.approx(brute[0])
        assert tuple(starts) == brute[1]


def test_block_structure_is_recovered_and_knee_picks_its_count():
    sim = _block_matrix([4, 7, 5])
    ts = [int(t) for t in np.linspace(0, 999, 16)]
    iv = intervals_from_similarity(sim, ts, 1000, k=None, k_max=6)
    assert iv.k == 3
    assert iv.meta["group_starts"] == [0, 4, 11]
    assert iv.starts[1] == round((ts[3] + ts[4]) / 2)
    assert knee([10, 5, 4.8, 4.7, 4.6]) == 2


def test_intervals_round_trip_and_routing(tmp_path):
    iv = Intervals((0, 250, 600), 1000)
    iv.save(tmp_path / "iv.json")
    back = Intervals.load(tmp_path / "iv.json")
    assert back == iv
    assert iv.bounds() == [(0, 249), (250, 599), (600, 999)]
    assert [iv.index(t) for t in (0, 249, 249.5, 250, 999)] == [0, 0, 0, 1, 2]
    assert iv.steps_served([999, 700, 500, 300, 100, 0]) == [2, 2, 2]


@pytest.mark.parametrize("starts", [(5, 100), (0, 300, 200), (0, 1000)])
def test_bad_intervals_are_refused(starts):
    with pytest.raises(FlexdiffError, match="starts"):
        Intervals(starts, 1000)


def test_bad_intervals_file(tmp_path):
    (tmp_path / "iv.json").write_text("{")
    with pytest.raises(FlexdiffError, match="not valid JSON"):
        Intervals.load(tmp_path / "iv.json")
    (tmp_path / "iv.json").write_text('{"starts": [0]}')
    with pytest.raises(FlexdiffError, match="num_train_timesteps"):
        Intervals.load(tmp_path / "iv.json")


def test_find_intervals_on_a_tiny_model(tmp_path, sched_cfg):
    images = torch.rand(16, 1, 16, 16) * 2 - 1
    iv = find_intervals(tiny_unet(), images, sched_cfg, tmp_path, num_timesteps=8, k=3)
    assert iv.k == 3 and iv.starts[0] == 0
    sims = np.load(tmp_path / "similarity.npz")
    for name in ("grad", "cka", "mean"):
        s = sims[name]
        assert s.shape == (8, 8)
        np.testing.assert_allclose(s, s.T, atol=1e-6)
        np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-5)
    assert (tmp_path / "similarity.png").stat().st_size > 0
    assert Intervals.load(tmp_path / "intervals.json") == iv
    with pytest.raises(FlexdiffError, match="--measure"):
        find_intervals(tiny_unet(), images, sched_cfg, tmp_path, measure="l2")
    with pytest.raises(FlexdiffError, match="--k 9"):
        find_intervals(tiny_unet(), images, sched_cfg, tmp_path, num_timesteps=8, k=9)
