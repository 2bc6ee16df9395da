"""The step engine stays in step with the pipeline: late starts (img2img strength), interrupted
runs, two UNet calls per step, a second call inside one `with`; and refuses a timestep it cannot place.

The loops below are what diffusers pipelines do: `scheduler.set_timesteps` at the start of a
call, then one or two UNet calls per timestep from some start index.
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from flexdiff.engine import apply_schedule
from flexdiff.errors import FlexdiffError
from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG
from flexdiff.schedule import Schedule

N = 10
DEEPCACHE = Schedule.deepcache("ddim", N, 3, 0)  # F P P F P P F P P F


def _scheduler():
    return DDIMScheduler.from_config(DEFAULT_SCHEDULER_CONFIG)


def _run(unet, scheduler, x, start=0, stop=N, two_calls=False):
    """A pipeline call: set_timesteps, then the UNet at timesteps[start:stop] (twice per step if asked)."""
    scheduler.set_timesteps(N)
    for t in scheduler.timesteps[start:stop]:
        if two_calls:  # guidance in two calls: the "unconditional" input, then the "conditional" one
            eps = torch.cat([unet(x[:1], t).sample, unet(x[1:], t).sample])
        else:
            eps = unet(x, t).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


def _with(unet, schedule, fn):
    scheduler = _scheduler()
    with apply_schedule(SimpleNamespace(unet=unet, scheduler=scheduler), schedule) as engine:
        return fn(scheduler), dict(engine.calls)


def test_a_late_start_runs_the_schedule_from_its_own_step(unet):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    late, calls = _with(unet, DEEPCACHE, lambda s: _run(unet, s, x, start=4))
    # only steps 4..9 ran: step 4 is partial in the schedule but has no cache yet, so it runs full
    assert calls == {"full": 3, "partial": 3, "null": 0}  # steps 4(F) 5(P) 6(F) 7(P) 8(P) 9(F)
    same_from_4 = Schedule("ddim", Schedule.full("ddim", 4).steps + DEEPCACHE.steps[4:])
    other, _ = _with(unet, same_from_4, lambda s: _run(unet, s, x, start=4))
    assert torch.equal(late, other)  # what the steps before the start say does not matter
    shifted, _ = _with(unet, Schedule("ddim", DEEPCACHE.steps[:4] + DEEPCACHE.steps[:6]),
                       lambda s: _run(unet, s, x, start=4))
    assert not torch.equal(late, shifted)  # a counter would have run steps 0..5's kinds here


def test_two_pipeline_calls_in_one_with_give_the_same_images(unet):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    (first, second), _ = _with(unet, DEEPCACHE, lambda s: (_run(unet, s, x, start=5), _run(unet, s, x, start=5)))
    assert torch.equal(first, second)


def test_an_interrupted_run_does_not_shift_the_next_one(unet):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    fresh, _ = _with(unet, DEEPCACHE, lambda s: _run(unet, s, x))
    after, calls = _with(unet, DEEPCACHE, lambda s: (_run(unet, s, x, stop=3), _run(unet, s, x))[1])
    assert torch.equal(fresh, after)
    assert calls == {"full": 1 + 4, "partial": 2 + 6, "null": 0}


def test_two_unet_calls_per_step_match_one_batched_call(unet):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    batched, calls1 = _with(unet, DEEPCACHE, lambda s: _run(unet, s, x))
    split, calls2 = _with(unet, DEEPCACHE, lambda s: _run(unet, s, x, two_calls=True))
    assert torch.allclose(batched, split, atol=1e-4)  # each call of a step has its own cache (batch-size rounding only)
    assert calls2 == {k: 2 * v for k, v in calls1.items()}


def test_a_timestep_outside_the_schedulers_list_is_refused(unet):
    scheduler = _scheduler()
    with apply_schedule(SimpleNamespace(unet=unet, scheduler=scheduler), DEEPCACHE):
        scheduler.set_timesteps(N)
        with pytest.raises(FlexdiffError, match="not one of the scheduler's 10 timesteps"):
            unet(torch.zeros(1, 1, 16, 16), torch.tensor(7))


def test_detach_restores_the_schedulers_own_set_timesteps(unet):
    scheduler = _scheduler()
    engine = apply_schedule(SimpleNamespace(unet=unet, scheduler=scheduler), DEEPCACHE)
    assert "set_timesteps" in vars(scheduler)
    engine.detach()
    assert "set_timesteps" not in vars(scheduler)


def test_a_schedule_with_its_own_timesteps_refuses_a_pipeline_that_spaces_them_itself(unet):
    from diffusers import DPMSolverMultistepScheduler

    sched = Schedule("dpmsolver++", Schedule.full("dpmsolver++", 4).steps, timesteps=(999, 700, 400, 100))
    scheduler = DPMSolverMultistepScheduler.from_config(DEFAULT_SCHEDULER_CONFIG)
    with apply_schedule(SimpleNamespace(unet=unet, scheduler=scheduler), sched):
        scheduler.set_timesteps(4)  # the pipeline's own spacing, not the schedule's
        with pytest.raises(FlexdiffError, match="timesteps=list"):
            unet(torch.zeros(1, 1, 16, 16), scheduler.timesteps[0])
        scheduler.set_timesteps(timesteps=[999, 700, 400, 100])
        assert unet(torch.zeros(1, 1, 16, 16), scheduler.timesteps[0]).sample.shape == (1, 1, 16, 16)


def test_stable_diffusion_img2img_through_the_real_pipeline(tmp_path):
    """diffusers' own img2img pipeline at strength 0.5: an all-full schedule is the plain pipeline, and a
    DeepCache schedule gives the same images on a second call (no state carried between calls)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    import tiny_pipelines
    from flexdiff.samplers import make_scheduler

    folder = tiny_pipelines.stable_diffusion(tmp_path / "sd")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16)

    def call():
        return pipe("a cat", image=image, strength=0.5, num_inference_steps=N, guidance_scale=3.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    plain = call()
    with apply_schedule(pipe, Schedule.full("ddim", N)):
        assert torch.allclose(call(), plain, atol=1e-6)
    with apply_schedule(pipe, DEEPCACHE) as engine:
        first, second = call(), call()
        assert engine.calls == {"full": 2 * 3, "partial": 2 * 2, "null": 0}  # steps 5(P->F) 6(F) 7(P) 8(P) 9(F)
    assert torch.equal(first, second)
