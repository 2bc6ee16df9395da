"""Elastic fine-tuning, the routing agent and the mixture on tiny random UNets: resume, budgets, round trips."""

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from conftest import tiny_unet
from flexdiff.cost import MixtureStepCosts, count_macs, measure_step_costs
from flexdiff.errors import FlexdiffError
from flexdiff.experts.agent import AgentConfig, SpecSpace, check_budget, choose_within_budget, train_agent
from flexdiff.experts.elastic import ElasticUNet
from flexdiff.experts.finetune import IntervalBatches, TuneConfig, taylor_importance, tune_elastic, tune_static
from flexdiff.mixture import Intervals, Mixture, load_mixture, save_mixture
from flexdiff.models import load_model
from flexdiff.samplers import make_scheduler
from flexdiff.sampling import initial_noise, sample
from flexdiff.schedule import Schedule


class _Killed(Exception):
    pass


class _KillAt:
    """A progress stand-in that raises at the n-th update, like a kill in the middle of a run."""

    def __init__(self, n):
        self.n, self.seen = n, 0

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        self.seen += 1
        if self.seen == self.n:
            raise _Killed

    def remove_task(self, *a):
        pass


def _images(n=32):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _batches(sched_cfg, lo=0, hi=999, teacher=None):
    return IntervalBatches(_images(), sched_cfg, lo, hi, teacher=teacher, model=teacher or tiny_unet())


def _states_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_static_fine_tuning_resumes_to_the_same_weights(tmp_path, sched_cfg):
    cfg = TuneConfig(steps=6, batch_size=4, checkpoint_every=2)
    teacher = tiny_unet(seed=5)
    a = tiny_unet()
    tune_static(a, _batches(sched_cfg, 100, 300, teacher), tmp_path / "a.pt", cfg)
    b = tiny_unet()
    with pytest.raises(_Killed):
        tune_static(b, _batches(sched_cfg, 100, 300, teacher), tmp_path / "b.pt", cfg, progress=_KillAt(5))
    b = tiny_unet()  # a new process: fresh weights, then the checkpoint
    tune_static(b, _batches(sched_cfg, 100, 300, teacher), tmp_path / "b.pt", cfg)
    assert _states_equal(a, b)
    assert not _states_equal(a, tiny_unet())
    with pytest.raises(FlexdiffError, match="other settings"):
        tune_static(tiny_unet(), _batches(sched_cfg), tmp_path / "b.pt", TuneConfig(steps=7, batch_size=4))


def test_elastic_sandwich_training_resumes_and_trains_every_size(tmp_path, sched_cfg):
    cfg = TuneConfig(steps=4, batch_size=4, checkpoint_every=1)
    teacher = tiny_unet(seed=5)

    def fresh():
        e = ElasticUNet(tiny_unet())
        e.apply_importance(*taylor_importance(e, _batches(sched_cfg), num_batches=2, batch_size=4))
        return e

    a = fresh()
    before = copy.deepcopy(a.unet)
    tune_elastic(a, _batches(sched_cfg, 0, 400, teacher), tmp_path / "a.pt", cfg)
    b = fresh()
    with pytest.raises(_Killed):
        tune_elastic(b, _batches(sched_cfg, 0, 400, teacher), tmp_path / "b.pt", cfg, progress=_KillAt(3))
    b = fresh()
    tune_elastic(b, _batches(sched_cfg, 0, 400, teacher), tmp_path / "b.pt", cfg)
    assert _states_equal(a.unet, b.unet)
    # the smallest sub-network's channels moved too (the sandwich trains it every step)
    k = a.smallest().widths[1]
    w_new = a.unet.down_blocks[1].resnets[0].conv1.weight[:k]
    assert not torch.equal(w_new, before.down_blocks[1].resnets[0].conv1.weight[:k])


def _space(e):
    return SpecSpace(e, lambda spec: count_macs(e.template(spec)))


def test_expected_macs_is_the_exact_expectation():
    e = ElasticUNet(tiny_unet())
    space = _space(e)
    g = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(n, generator=g), 0) for n in space.shape]
    brute = 0.0
    for idx in itertools.product(*(range(n) for n in space.shape)):
        p = np.prod([float(probs[f][k]) for f, k in enumerate(idx)])
        brute += p * count_macs(e.template(space.spec(idx)))
    assert float(space.expected_macs(probs)) == pytest.approx(brute, rel=1e-9)
    assert float(space.macs.max()) == pytest.approx(count_macs(tiny_unet()))


def test_budget_choice_is_the_best_feasible_joint_setting():
    rng = np.random.default_rng(0)
    logps = [np.log(rng.dirichlet(np.ones(5))) for _ in range(3)]
    macs = [rng.uniform(1, 10, 5) for _ in range(3)]
    budget = 15.0
    best = max((sum(lp[k] for lp, k in zip(logps, ks)), ks) for ks in itertools.product(range(5), repeat=3)
               if sum(m[k] for m, k in zip(macs, ks)) <= budget)
    assert tuple(choose_within_budget(logps, macs, budget)) == best[1]
    with pytest.raises(FlexdiffError, match="fits the budget"):
        choose_within_budget(logps, macs, 0.5)


def test_budget_choice_spends_the_budget_when_asked():
    rng = np.random.default_rng(1)
    logps = [np.log(rng.dirichlet(np.ones(6))) for _ in range(3)]
    macs = [rng.uniform(1, 10, 6) for _ in range(3)]
    budget, spend = 18.0, 0.9
    combos = list(itertools.product(range(6), repeat=3))
    cost = {ks: sum(m[k] for m, k in zip(macs, ks)) for ks in combos}
    score = {ks: sum(lp[k] for lp, k in zip(logps, ks)) for ks in combos}
    in_window = [ks for ks in combos if spend * budget <= cost[ks] <= budget]
    mode = max((ks for ks in combos if cost[ks] <= budget), key=score.get)
    assert cost[mode] < spend * budget  # the case that matters: the plain mode leaves budget unspent
    picks = tuple(choose_within_budget(logps, macs, budget, spend))
    assert spend * budget <= cost[picks] <= budget
    assert score[picks] == pytest.approx(max(score[ks] for ks in in_window), abs=1e-12)
    assert tuple(choose_within_budget(logps, macs, budget, 0.0)) == mode
    # no setting reaches the floor (every cost below it): the most probable one within the budget, as without it
    assert tuple(choose_within_budget(logps, macs, 100.0, 0.9)) == max(combos, key=score.get)


def test_agent_scores_sub_networks_on_the_teachers_prediction(tmp_path, sched_cfg):
    teacher = tiny_unet(seed=5)
    elastics = [ElasticUNet(tiny_unet(seed=s)) for s in (1, 2)]
    batches = [_batches(sched_cfg, 0, 499, teacher), _batches(sched_cfg, 500, 999, teacher)]
    space = _space(elastics[0])
    runs = {}
    for score in ("teacher", "denoise"):
        cfg = AgentConfig(steps=1, samples=2, batch_size=4, score=score)
        train_agent(elastics, batches, space, [3, 7], 0.7, tmp_path / score, cfg)
        runs[score] = json.loads((tmp_path / score / "history.json").read_text())[0]["losses"]
    # the same draws (same seed): the denoising loss adds the regression target's error to the teacher distance
    assert all(0 < t < d for t, d in zip(runs["teacher"], runs["denoise"]))
    with pytest.raises(FlexdiffError, match="--agent-score 'fid'"):
        train_agent(elastics, batches, space, [3, 7], 0.7, tmp_path / "bad", AgentConfig(steps=1, score="fid"))
    assert not (tmp_path / "bad" / "agent.pt").exists()


def test_impossible_budget_is_refused_before_training():
    e = ElasticUNet(tiny_unet())
    space = _space(e)
    full = float(space.macs.max()) * 10
    with pytest.raises(FlexdiffError, match="cannot be met"):
        check_budget(space, [4, 6], 0.05, full)
    with pytest.raises(FlexdiffError, match=r"\(0, 1\]"):
        check_budget(space, [4, 6], 1.5, full)
    check_budget(space, [4, 6], 0.9, full)


def test_agent_meets_the_budget_reports_the_split_and_resumes(tmp_path, sched_cfg):
    teacher = tiny_unet(seed=5)
    elastics = [ElasticUNet(tiny_unet(seed=s)) for s in (1, 2)]
    batches = [_batches(sched_cfg, 0, 499, teacher), _batches(sched_cfg, 500, 999, teacher)]
    space = _space(elastics[0])
    served, budget = [3, 7], 0.7
    cfg = AgentConfig(steps=6, samples=2, batch_size=4, checkpoint_every=2)
    a = train_agent(elastics, batches, space, served, budget, tmp_path / "a", cfg)
    assert a["fraction_of_teacher"] <= budget + 1e-9
    assert [x["steps_served"] for x in a["experts"]] == served
    assert sum(x["share_of_run"] for x in a["experts"]) == pytest.approx(1.0)
    for x in a["experts"]:
        elastics[0].validate(type(elastics[0].full).from_dict(x["spec"]))
    assert (tmp_path / "a" / "agent.png").stat().st_size > 0
    with pytest.raises(_Killed):
        train_agent(elastics, batches, space, served, budget, tmp_path / "b", cfg, progress=_KillAt(5))
    b = train_agent(elastics, batches, space, served, budget, tmp_path / "b", cfg)
    a.pop("wall_time_s"), b.pop("wall_time_s")
    assert a == b


def _tiny_mixture(sched_cfg):
    e = ElasticUNet(tiny_unet())
    experts = [e.extract(e.full), e.extract(e.smallest()), tiny_unet(seed=7)]
    return Mixture(experts, Intervals((0, 300, 700), 1000), sched_cfg), [e.full, e.smallest(), e.full]


def test_mixture_routes_by_timestep_and_round_trips(tmp_path, sched_cfg):
    mix, specs = _tiny_mixture(sched_cfg)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        for t, k in ((0, 0), (299, 0), (300, 1), (999, 2)):
            torch.testing.assert_close(mix(x, t).sample, mix.experts[k](x, t).sample)
        t = torch.tensor([10, 500, 900, 20])  # one batch across three intervals
        want = torch.cat([mix.experts[k](x[i:i + 1], t[i:i + 1]).sample for i, k in enumerate([0, 1, 2, 0])])
        torch.testing.assert_close(mix(x, t).sample, want)
    save_mixture(list(mix.experts), mix.intervals, specs, sched_cfg, tmp_path / "mix", dict(budget=0.5))
    loaded = load_model(tmp_path / "mix")
    assert isinstance(loaded.unet, Mixture) and loaded.unet.intervals == mix.intervals
    with torch.no_grad():
        for t in (5, 450, 800):
            torch.testing.assert_close(loaded.unet(x, t).sample, mix(x, t).sample)
    man = json.loads((tmp_path / "mix" / "mixture.json").read_text())
    assert man["budget"] == 0.5 and man["experts"][1]["spec"] == specs[1].to_dict()


def test_broken_mixture_folders_are_named(tmp_path, sched_cfg):
    mix, specs = _tiny_mixture(sched_cfg)
    save_mixture(list(mix.experts), mix.intervals, specs, sched_cfg, tmp_path / "mix")
    man_file = tmp_path / "mix" / "mixture.json"
    man = json.loads(man_file.read_text())
    man["experts"][2]["folder"] = "missing"
    man_file.write_text(json.dumps(man))
    with pytest.raises(FlexdiffError, match=r"experts\[2\].folder 'missing'"):
        load_mixture(tmp_path / "mix")
    man_file.write_text(json.dumps({**man, "format": "other"}))
    with pytest.raises(FlexdiffError, match="format"):
        load_mixture(tmp_path / "mix")


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "euler", "unipc"])
def test_mixture_in_the_step_engine_equals_routing_by_hand(sched_cfg, sampler):
    mix, _ = _tiny_mixture(sched_cfg)
    noise = initial_noise(2, (1, 16, 16), 0)
    ours = sample(mix, sched_cfg, Schedule.full(sampler, 8), noise).images
    sch = make_scheduler(sampler, sched_cfg)
    sch.set_timesteps(8)
    x = noise * sch.init_noise_sigma
    with torch.no_grad():
        for t in sch.timesteps:
            k = mix.intervals.index(float(t))
            x = sch.step(mix.experts[k](sch.scale_model_input(x, t), t).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)


def test_partial_steps_use_the_expert_of_the_last_full_step(sched_cfg):
    mix, _ = _tiny_mixture(sched_cfg)
    calls = []
    handles = [e.register_forward_hook(lambda m, a, o, k=k: calls.append(k)) for k, e in enumerate(mix.experts)]
    sch = make_scheduler("ddim", sched_cfg)
    sch.set_timesteps(10)
    ts = [float(t) for t in sch.timesteps]
    sched = Schedule.deepcache("ddim", 10, 4, 0)
    sample(mix, sched_cfg, sched, initial_noise(1, (1, 16, 16), 0))
    for h in handles:
        h.remove()
    want, last = [], 0
    for step, t in zip(sched.steps, ts):
        if step.kind.value == "full":
            last = mix.intervals.index(t)
        want.append(last)
    assert calls == want and len(set(calls)) > 1
    costs = measure_step_costs(mix)
    assert isinstance(costs, MixtureStepCosts)
    per = [c.step_macs(s.kind, s.branch) for c, s in zip([costs.experts[k] for k in want], sched.steps)]
    assert costs.schedule_macs(sched) == pytest.approx(sum(per))


def test_a_diffusers_pipeline_samples_with_a_mixture(sched_cfg):
    from diffusers import DDIMPipeline

    mix, _ = _tiny_mixture(sched_cfg)
    pipe = DDIMPipeline(unet=mix, scheduler=make_scheduler("ddim", sched_cfg))
    ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=7, eta=0.0,
               output_type="np").images
    noise = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(1))
    ours = sample(mix, sched_cfg, Schedule.full("ddim", 7), noise).images
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - ref).max() <= 1e-5


def test_a_corrupt_checkpoint_is_named_not_a_traceback(tmp_path, sched_cfg):
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FlexdiffError, match=r"c.pt: cannot read this checkpoint"):
        tune_static(tiny_unet(), _batches(sched_cfg), tmp_path / "c.pt", TuneConfig(steps=2, batch_size=4))
