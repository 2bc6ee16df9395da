"""The rule for a win (docs/metrics.md): better on the headline *and* not separated worse on the class mix; kNN
precision and recall beside them; and the search's fitness respecting the rule."""

import numpy as np
import pytest

from flexdiff.metrics import QualityMeter, verdict
from flexdiff.metrics.fid import Estimate, paired_class_tv_difference
from flexdiff.metrics.manifold import precision_recall
from flexdiff.search.fitness import CLASS_MIX_PENALTY, Fitness


def test_precision_recall_separate_fidelity_from_diversity():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(600, 8))
    same = rng.normal(size=(400, 8))
    collapsed = np.repeat(rng.normal(size=(8, 8)) * 0.2, 50, axis=0) + rng.normal(size=(400, 8)) * 0.01
    off = rng.normal(size=(400, 8)) + 6.0
    p, r = precision_recall(same, ref)
    assert p.value > 0.6 and r.value > 0.6 and p.lo <= p.value <= p.hi
    pc, rc = precision_recall(collapsed, ref)
    assert pc.value > 0.9 and rc.value < 0.2  # on the manifold, but covering little of it
    po, ro = precision_recall(off, ref)
    assert po.value < 0.05 and ro.value < 0.05
    with pytest.raises(ValueError):
        precision_recall(same[:3], ref)


def test_paired_class_tv_difference_is_paired_and_signed():
    shares = np.full(10, 0.1)
    balanced = np.tile(np.arange(10), 30)
    skewed = balanced.copy()
    skewed[:150] = 3  # half the samples become a 3
    d = paired_class_tv_difference(skewed, balanced, shares)
    assert d.value > 0.3 and d.lo > 0
    assert paired_class_tv_difference(balanced, skewed, shares).hi < 0
    same = paired_class_tv_difference(balanced, balanced, shares)
    assert same.value == same.lo == same.hi == 0.0  # paired: identical draws cancel in every resample
    with pytest.raises(ValueError):
        paired_class_tv_difference(balanced[:10], balanced, shares)


def test_verdict_refuses_a_win_bought_with_the_class_mix():
    better, tie, worse = Estimate(-3, -5, -1), Estimate(-1, -3, 1), Estimate(3, 1, 5)
    mix_worse, mix_same = Estimate(0.06, 0.02, 0.10), Estimate(0.01, -0.02, 0.04)
    assert verdict(better, mix_same) == "better"
    assert verdict(better, None) == "better"
    assert verdict(better, mix_worse) == "better headline, worse class mix"
    assert verdict(tie, mix_worse) == "tie" and verdict(worse, mix_same) == "worse"
    assert verdict(better.to_dict(), mix_worse.to_dict()) == "better headline, worse class mix"


def _toy_meter():
    """A QualityMeter on 2-d features whose classifier reads the class off the first coordinate."""
    rng = np.random.default_rng(1)
    classes = np.tile(np.arange(10), 40)
    ref = np.stack([classes + rng.normal(0, 0.1, len(classes)), rng.normal(size=len(classes))], 1)

    def classify(f):
        return np.clip(np.rint(f[:, 0]), 0, 9).astype(int)

    return QualityMeter(lambda x: np.asarray(x, dtype=float), ref, "toy", classify=classify), ref


def _fitness(meter, teacher, guard=True):
    f = Fitness.__new__(Fitness)  # the scoring alone: no model, no sampling
    f.meter, f.metric, f.teacher, f.class_guard = meter, "rfid", teacher, guard
    return f


def test_search_fitness_ranks_a_shifted_class_mix_last():
    meter, ref = _toy_meter()
    rng = np.random.default_rng(2)
    teacher = ref[rng.permutation(len(ref))[:200]] + rng.normal(0, 0.01, (200, 2))
    close = teacher + rng.normal(0, 0.05, teacher.shape)
    shifted = close.copy()
    shifted[:100, 0] = 3.0  # half the samples turn into one class: a class-balanced distance barely moves
    guarded = _fitness(meter, teacher)
    assert guarded.score(close) < CLASS_MIX_PENALTY
    assert guarded.score(shifted) >= CLASS_MIX_PENALTY > guarded.score(close)
    plain = _fitness(meter, teacher, guard=False)
    assert plain.score(shifted) == pytest.approx(guarded.score(shifted) - CLASS_MIX_PENALTY)
    assert plain.score(close) == guarded.score(close)


def test_searched_schedules_meet_each_hook_at_its_best_setting_that_spent_at_least_their_macs():
    """Within the budget: the best peer per family. Beyond it: each diffusers hook's best setting among those with
    at least the schedule's MACs (they land where their run-time decisions take them), each pair once."""
    from flexdiff.bench.methods import Method
    from flexdiff.bench.report import search_comparisons
    from flexdiff.schedule import Schedule

    meter, ref = _toy_meter()
    rng = np.random.default_rng(3)
    plain = Schedule.full("flow-euler", 4)
    flex = Method("flex", "flexiffusion", Schedule("flow-euler", plain.steps, "flex", meta=dict(budget=0.25)))
    rows = [flex, Method("euler-3", "flow-euler", plain), Method("fbc low", "hook-fbc", plain),
            Method("fbc high", "hook-fbc", plain), Method("pab cheap", "hook-pab", plain),
            Method("fora", "fora", plain)]
    macs = {"flex": 20.0, "euler-3": 15.0, "fbc low": 60.0, "fbc high": 30.0, "pab cheap": 10.0, "fora": 40.0}
    quality = {r.name: float(i) for i, r in enumerate(rows)}
    feats = {r.name: ref[rng.permutation(len(ref))[:120]] for r in rows}
    pairs = search_comparisons([(r,) for r in rows], feats, meter, macs, quality, teacher_macs=100.0)
    peers = [c["peer"] for c in pairs]
    # within 1/4 of 100: euler-3 and pab cheap (best of their families); above the schedule's 20: fbc's better
    # setting of the two that spent more (quality 2.0 beats 3.0)
    assert sorted(peers) == ["euler-3", "fbc low", "pab cheap"]
    assert all(c["verdict"] in ("better", "worse", "tie", "better headline, worse class mix") for c in pairs)
    assert "fora" not in peers  # a static cache over the budget is not a hook: compared only within the budget

