"""Shared prefixes of sampling runs (prefixes.py): a schedule resumed from another's state before a full step gives
bit-identical images to a run from the start, on UNets and transformers, with single- and multistep solvers,
several batches and guidance; the cache resumes only where the first steps, the timesteps and the sampler agree,
stays inside its byte budget, and forgets everything when the noise changes."""

import numpy as np
import pytest
import torch

from conftest import tiny_class_unet
from flexdiff.models import DEFAULT_LABEL_TOKENS, build_default_transformer
from flexdiff.prefixes import PrefixCache
from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG, FLOW_SCHEDULER_CONFIG
from flexdiff.sampling import class_conditioning, initial_noise, sample
from flexdiff.schedule import Schedule


def _schedule(steps: str, sampler: str, timesteps=None) -> Schedule:
    data = {"sampler": sampler, "steps": steps.split()}
    if timesteps is not None:
        data["timesteps"] = list(timesteps)
    return Schedule.from_dict(data)


def _family(steps: str, sampler: str) -> list[Schedule]:
    """Schedules that share their first steps with `steps` (and one that shares nothing past step 0)."""
    base = steps.split()
    variants = [base, base[:-2] + ["null", "full"], base[:3] + ["full"] + base[4:], ["full"] + ["null"] * (len(base) - 1)]
    return [_schedule(" ".join(v), sampler) for v in variants]


def _check_exact(model, cfg, schedules, noise, batch, cond=None):
    cache = PrefixCache()
    for s in schedules:
        fresh = sample(model, cfg, s, noise, batch, cond=cond).images
        cached = sample(model, cfg, s, noise, batch, cond=cond, prefixes=cache).images
        assert torch.equal(fresh, cached), s.describe()
    return cache


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "unipc"])
def test_a_unet_resumed_from_a_shared_prefix_gives_the_same_images(sampler):
    unet = tiny_class_unet()
    schedules = _family("full partial:0 full null full partial:1 full partial:0", sampler)
    noise = initial_noise(5, (1, 16, 16), 3)
    cond = class_conditioning(unet, (0, 2), 5, guidance=2.0)
    cache = _check_exact(unet, DEFAULT_SCHEDULER_CONFIG, schedules, noise, batch=3, cond=cond)  # 2 batches, guided
    assert cache.steps_skipped > 0  # it did resume


@pytest.mark.parametrize("sampler", ["flow-euler", "flow-dpmsolver++"])
def test_a_flow_transformer_resumed_from_a_shared_prefix_gives_the_same_images(sampler):
    model = build_default_transformer(0, num_layers=1, num_single_layers=3).eval()
    schedules = _family("full partial:0 full partial:1 null full partial:0 full", sampler)
    noise = initial_noise(4, (1, 16, 16), 5)
    cache = _check_exact(model, FLOW_SCHEDULER_CONFIG, schedules, noise, batch=4)
    assert cache.steps_skipped > 0
    assert model.flexdiff_label_tokens == DEFAULT_LABEL_TOKENS


def test_the_cache_resumes_only_where_sampler_timesteps_and_first_steps_agree():
    unet = tiny_class_unet()
    noise = initial_noise(2, (1, 16, 16), 0)
    cache = PrefixCache()
    a = _schedule("full null full partial:0 full null", "dpmsolver++")
    sample(unet, DEFAULT_SCHEDULER_CONFIG, a, noise, 2, prefixes=cache)
    assert len(cache) == 2  # before steps 2 and 4: the full steps after the first
    for other in (_schedule("full null full partial:0 full null", "ddim"),  # another sampler
                  _schedule("full null full partial:0 full null full", "dpmsolver++"),  # another step count
                  _schedule("full partial:0 full partial:0 full null", "dpmsolver++"),  # differs at step 1
                  _schedule("full null full partial:0 full null", "dpmsolver++",
                            timesteps=(999, 800, 600, 400, 200, 0))):  # other timesteps
        before = cache.steps_skipped
        sample(unet, DEFAULT_SCHEDULER_CONFIG, other, noise, 2, prefixes=cache)
        assert cache.steps_skipped == before, other.describe()
    before = cache.steps_skipped
    sample(unet, DEFAULT_SCHEDULER_CONFIG, _schedule("full null full partial:0 full full", "dpmsolver++"),
           noise, 2, prefixes=cache)
    assert cache.steps_skipped == before + 4  # resumed before step 4


def test_the_cache_keeps_to_its_budget_and_forgets_on_new_noise():
    unet = tiny_class_unet()
    noise = initial_noise(2, (1, 16, 16), 0)
    s = _schedule("full full full full full full", "dpmsolver++")
    one = PrefixCache()
    sample(unet, DEFAULT_SCHEDULER_CONFIG, s, noise, 2, prefixes=one)
    per_state = one.nbytes / len(one)
    small = PrefixCache(max_bytes=int(2.5 * per_state))
    sample(unet, DEFAULT_SCHEDULER_CONFIG, s, noise, 2, prefixes=small)
    assert len(small) == 2 and small.nbytes <= small.max_bytes
    # the two latest states are kept: a schedule that shares only the first two steps finds nothing
    before = small.steps_skipped
    sample(unet, DEFAULT_SCHEDULER_CONFIG, _schedule("full full null null null null", "dpmsolver++"),
           noise, 2, prefixes=small)
    assert small.steps_skipped == before
    other = initial_noise(2, (1, 16, 16), 1)
    sample(unet, DEFAULT_SCHEDULER_CONFIG, s, other, 2, prefixes=one)  # new noise: the old states are dropped
    before = one.steps_skipped
    fresh = sample(unet, DEFAULT_SCHEDULER_CONFIG, s, other, 2).images
    again = sample(unet, DEFAULT_SCHEDULER_CONFIG, s, other, 2, prefixes=one).images
    assert one.steps_skipped == before + 5 and torch.equal(fresh, again)


def test_a_search_with_the_prefix_cache_scores_as_one_without(tmp_path):
    """The fitness resumes candidates from one another; every score equals a fresh fitness's score."""
    from flexdiff.metrics.paired import PixelMeter
    from flexdiff.models import LoadedModel
    from flexdiff.search.fitness import Fitness

    unet = tiny_class_unet()
    model = LoadedModel(unet=unet, scheduler_config=dict(DEFAULT_SCHEDULER_CONFIG), path=tmp_path)
    meter = PixelMeter((1, 16, 16))
    teacher = Schedule.teacher(DEFAULT_SCHEDULER_CONFIG, 10)
    cands = _family("full partial:0 full null full partial:1 full partial:0", "dpmsolver++")
    cached = Fitness(model, meter, teacher, "distance", 6, 0, tmp_path / "a", batch_size=6)
    scores = [cached(s)[0] for s in cands]
    assert cached.prefixes.steps_skipped > 0
    for s, value in zip(cands, scores):
        plain = Fitness(model, meter, teacher, "distance", 6, 0, tmp_path / "a", batch_size=6)
        plain.prefixes = None
        assert np.float64(plain.score(plain.meter.features(plain._images(s, "x")))) == value
