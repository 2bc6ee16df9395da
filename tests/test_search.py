"""Schedule search: space encoding, budget repair, caching, resume after a kill, Pareto front."""

import json

import numpy as np
import pytest

from flexdiff.cost import StepCosts
from flexdiff.errors import FlexdiffError
from flexdiff.schedule import Schedule, StepKind
from flexdiff.search import Search, SearchConfig, SegmentSpace, StepwiseSpace
from flexdiff.search.space import space_from_dict

COSTS = StepCosts(full=100.0, partial=(10.0, 30.0, 50.0, 70.0))
TEACHER_MACS = 100 * 100.0
SPACE = SegmentSpace(sampler="ddim", step_choices=(10, 20), length_choices=(1, 2, 3, 4), branches=(0, 1, 2, 3))


class FakeFitness:
    """Deterministic stand-in for sampling: cheap steps and few steps cost quality."""

    def __init__(self):
        self.calls = []

    def __call__(self, s: Schedule):
        self.calls.append(s.key())
        err = 30.0 / s.num_steps
        for st in s.steps:
            if st.kind is StepKind.PARTIAL:
                err += 0.4 / (1 + st.branch)
            elif st.kind is StepKind.NULL:
                err += 1.0
        return err, 0.0


def test_segment_layout_and_truncation():
    g = {"T": 7, "L": 3, "segments": [[1, 2], [2, 0], [0, 1]]}
    assert [s.to_str() for s in SPACE.to_schedule(g).steps] == \
        ["full", "partial:2", "null", "full", "partial:0", "partial:0", "full"]


def test_uniform_segments_are_deepcache():
    for L in (2, 3, 4):
        assert SPACE.to_schedule(SPACE.uniform(20, L, L - 1, 1)).steps == Schedule.deepcache("ddim", 20, L, 1).steps


def test_random_mutated_crossed_genomes_stay_valid_and_repair_meets_budget():
    rng = np.random.default_rng(0)
    budget = TEACHER_MACS / 20
    for space in (SPACE, StepwiseSpace(step_choices=(4, 6), branches=(0, 1, 2, 3))):
        pop = [space.random(rng) for _ in range(10)]
        for _ in range(200):
            a, b = pop[rng.integers(10)], pop[rng.integers(10)]
            child = space.mutate(space.crossover(a, b, rng), rng)
            s = space.to_schedule(child)  # validates: first step full, timesteps decreasing
            assert s.steps[0].kind is StepKind.FULL
            fixed = space.repair(child, COSTS, budget, rng)
            if fixed is not None:
                assert COSTS.schedule_macs(space.to_schedule(fixed)) <= budget
            pop[rng.integers(10)] = child


def test_repair_gives_up_when_full_steps_alone_exceed_budget():
    g = SPACE.uniform(20, 1, 0, 0)  # 20 full steps = 2000 MACs
    assert SPACE.repair(g, COSTS, 1999.0, np.random.default_rng(0)) is None


def _search(tmp_path, fitness=None, **cfg):
    cfg = SearchConfig(**{"budget": 1 / 16, "population": 8, "generations": 4, "eval_samples": 8, **cfg})
    return Search(SPACE, COSTS, TEACHER_MACS, fitness or FakeFitness(), cfg, tmp_path)


def test_search_respects_budget_caches_and_improves(tmp_path):
    fit = FakeFitness()
    res = _search(tmp_path, fit).run()
    assert len(fit.calls) == len(set(fit.calls)) == len(res.evaluated)  # nothing scored twice
    assert all(e["macs"] <= TEACHER_MACS / 16 for e in res.evaluated.values())
    assert res.best.meta["macs_per_image"] <= TEACHER_MACS / 16
    best = [h["best_fitness"] for h in res.history]
    assert best == sorted(best, reverse=True) and best[-1] < best[0]
    saved = Schedule.load(tmp_path / "best.json")
    assert saved == res.best and (tmp_path / "search.png").exists()
    assert len(json.loads((tmp_path / "history.json").read_text())) == 5


class Killed(Exception):
    pass


def test_killed_search_resumes_to_the_same_result(tmp_path):
    straight = _search(tmp_path / "a").run()

    def kill(gen):
        if gen == 2:
            raise Killed

    with pytest.raises(Killed):
        _search(tmp_path / "b").run(on_generation=kill)
    fit = FakeFitness()
    resumed = _search(tmp_path / "b", fit).run()
    assert resumed.best == straight.best and resumed.best.meta == straight.best.meta
    assert resumed.history == [dict(h, seconds=r["seconds"]) for h, r in zip(straight.history, resumed.history)]
    assert not set(fit.calls) & {k for k, e in resumed.evaluated.items() if e["generation"] <= 2}


def test_kill_inside_a_generation_loses_no_scored_candidate(tmp_path):
    straight = _search(tmp_path / "a").run()

    class Dies(FakeFitness):
        def __call__(self, s):
            if len(self.calls) == 13:  # inside generation 1 (generation 0 scores 8)
                raise Killed
            return super().__call__(s)

    dying = Dies()
    with pytest.raises(Killed):
        _search(tmp_path / "b", dying).run()
    fit = FakeFitness()
    resumed = _search(tmp_path / "b", fit).run()
    assert resumed.best == straight.best
    assert not set(fit.calls) & set(dying.calls)  # the 13 scored before the kill were not scored again


def test_resume_with_other_settings_is_refused(tmp_path):
    _search(tmp_path, generations=1).run()
    with pytest.raises(FlexdiffError, match="other settings"):
        _search(tmp_path, generations=1, population=6).run()


def test_impossible_budget_is_a_clear_error(tmp_path):
    space = SegmentSpace(sampler="ddim", step_choices=(20,), length_choices=(1, 2), branches=(0,))
    cfg = SearchConfig(budget=0.001, population=4, generations=1, eval_samples=8)
    with pytest.raises(FlexdiffError, match="no schedule in the search space fits the budget"):
        Search(space, COSTS, TEACHER_MACS, FakeFitness(), cfg, tmp_path).run()


def test_pareto_front_is_non_dominated_and_sorted(tmp_path):
    res = _search(tmp_path, budget=None, pareto=True, generations=5).run()
    pts = [(s.meta["fitness"], s.meta["macs_per_image"]) for s in res.front]
    assert len(pts) >= 3
    assert [m for _, m in pts] == sorted(m for _, m in pts)
    for f, m in pts:
        assert not any((f2 <= f and m2 <= m) and (f2, m2) != (f, m) for f2, m2 in
                       ((e["fitness"], e["macs"]) for e in res.evaluated.values()))
    assert len(json.loads((tmp_path / "front.json").read_text())) == len(pts)


def test_bad_settings():
    with pytest.raises(FlexdiffError, match="--budget"):
        SearchConfig(budget=1.5).check()
    with pytest.raises(FlexdiffError, match="give --budget or --speedup"):
        SearchConfig(budget=None).check()
    with pytest.raises(FlexdiffError, match="branches 0..3"):
        SegmentSpace(branches=(0, 9)).validate(4)


def test_space_round_trips_through_dict():
    for space in (SPACE, StepwiseSpace(step_choices=(4, 6))):
        assert space_from_dict(json.loads(json.dumps(space.to_dict()))) == space


def test_last_timestep_setting_spreads_steps_down_to_it():
    space = SegmentSpace(sampler="dpmsolver++", step_choices=(10,), length_choices=(2,), end_choices=(0, 200))
    g = dict(space.uniform(10, 2, 1, 0), end=200)
    s = space.to_schedule(g)
    assert s.timesteps[0] == 999 and s.timesteps[-1] == 200 and len(s.timesteps) == 10
    assert space.to_schedule(space.uniform(10, 2, 1, 0)).timesteps is None  # end 0: the sampler's own spacing
    rng = np.random.default_rng(1)
    ends = {space.mutate(g, rng).get("end") for _ in range(100)}
    assert ends == {0, 200}
    with pytest.raises(FlexdiffError, match="--ends"):
        SegmentSpace(step_choices=(10,), end_choices=(995,)).validate(6)
    assert SegmentSpace(sampler="ddim", end_choices=(0, 200))._ends() == (0,)


def test_every_search_starts_from_the_plain_sampler_that_fits_the_budget():
    space = SegmentSpace(sampler="dpmsolver++", step_choices=(4, 6, 8, 10), length_choices=(1, 2), branches=(0, 1),
                         end_choices=(0, 100))
    budget = 6.5 * COSTS.full  # room for 6 full steps, not 8
    seeds = space.budget_seeds(COSTS, budget)
    assert [(g["T"], g["L"], g["end"]) for g in seeds] == [(6, 1, 0), (6, 1, 100)]
    assert all(COSTS.schedule_macs(space.to_schedule(g)) <= budget for g in seeds)
    search = Search(space, COSTS, TEACHER_MACS, FakeFitness(), SearchConfig(budget=budget / TEACHER_MACS, population=4),
                    out_dir=".")
    first = {space.to_schedule(g).key() for g in search._initial(np.random.default_rng(0))}
    assert {space.to_schedule(g).key() for g in seeds} <= first
    stepwise = StepwiseSpace(step_choices=(4, 6, 8), branches=(0, 1))
    assert [len(g["kinds"]) for g in stepwise.budget_seeds(COSTS, budget)] == [6]
    assert space.budget_seeds(COSTS, 3 * COSTS.full) == []  # no plain sampler fits: the search goes on without one


def test_proxy_candidates_from_a_search_span_its_fitness_ranks_within_its_budget(tmp_path):
    from flexdiff.search.proxy import search_candidates

    res = _search(tmp_path / "s").run()
    picked = search_candidates(tmp_path / "s", 5, model_fingerprint="any")  # a search without a model fingerprint
    ranked = sorted(res.evaluated.items(), key=lambda kv: (kv[1]["fitness"], kv[0]))
    assert len(picked) == 5
    assert picked[0].key() == ranked[0][0] and picked[-1].key() == ranked[-1][0]  # best and worst both in
    assert all(COSTS.schedule_macs(s) <= TEACHER_MACS / 16 for s in picked)
    with pytest.raises(FlexdiffError, match="no search_state.json"):
        search_candidates(tmp_path, 5, "any")
    state = json.loads((tmp_path / "s" / "search_state.json").read_text())
    state["identity"]["model"] = "abc"
    (tmp_path / "s" / "search_state.json").write_text(json.dumps(state))
    with pytest.raises(FlexdiffError, match="another model"):
        search_candidates(tmp_path / "s", 5, "def")
    broken = json.loads(json.dumps(state))
    next(iter(broken["evaluated"].values())).pop("genome")
    (tmp_path / "s" / "search_state.json").write_text(json.dumps(broken))
    with pytest.raises(FlexdiffError, match="damaged search state"):
        search_candidates(tmp_path / "s", 50, "abc")  # every candidate asked for, the broken one included
    del state["identity"]["space"]
    (tmp_path / "s" / "search_state.json").write_text(json.dumps(state))
    with pytest.raises(FlexdiffError, match="damaged search state"):
        search_candidates(tmp_path / "s", 5, "abc")
