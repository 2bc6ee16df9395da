"""Invariants of the step engine on tiny random UNets (an all-full schedule is the plain sampler; hooks come off cleanly)."""

import copy

import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline
from diffusers.utils.torch_utils import randn_tensor

from conftest import tiny_unet
from flexdiff.anatomy import anatomy
from flexdiff.engine import HOOK_NAME, StepEngine, apply_schedule
from flexdiff.errors import FlexdiffError
from flexdiff.samplers import make_scheduler
from flexdiff.sampling import Conditioning, initial_noise, sample
from flexdiff.schedule import FULL, NULL, Schedule, partial


def _noise(shape, seed=1):
    return randn_tensor(shape, generator=torch.Generator().manual_seed(seed))


def _no_flexdiff_hooks(model):
    return all(
        not (hasattr(m, "_diffusers_hook") and m._diffusers_hook.get_hook(HOOK_NAME))
        for m in model.modules()
    )


def test_all_full_ddim_matches_diffusers_pipeline(unet, sched_cfg):
    steps, n = 12, 3
    pipe = DDIMPipeline(unet, make_scheduler("ddim", sched_cfg))
    ref = pipe(batch_size=n, generator=torch.Generator().manual_seed(1), num_inference_steps=steps,
               eta=0.0, output_type="np").images
    ours = sample(unet, sched_cfg, Schedule.full("ddim", steps), _noise((n, 1, 16, 16))).images
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - ref).max() <= 1e-5


def test_all_full_dpmsolver_matches_diffusers_pipeline(unet, sched_cfg):
    steps, n = 8, 3
    pipe = DDPMPipeline(unet, make_scheduler("dpmsolver++", sched_cfg))
    ref = pipe(batch_size=n, generator=torch.Generator().manual_seed(1), num_inference_steps=steps,
               output_type="np").images
    ours = sample(unet, sched_cfg, Schedule.full("dpmsolver++", steps), _noise((n, 1, 16, 16))).images
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - ref).max() <= 1e-5


def _plain_loop(unet, sampler, steps, noise, sched_cfg, ehs=None, guidance=1.0):
    """The diffusers sampling loop written out with no hooks at all (reference)."""
    sch = make_scheduler(sampler, sched_cfg)
    sch.set_timesteps(steps)
    x = noise * sch.init_noise_sigma
    for t in sch.timesteps:
        if ehs is None:
            eps = unet(sch.scale_model_input(x, t), t).sample
        else:
            xin = sch.scale_model_input(torch.cat([x, x]), t)
            cond = ehs.expand(len(x), *ehs.shape[1:])
            e = torch.cat([torch.zeros_like(cond), cond])
            eu, ec = unet(xin, t, encoder_hidden_states=e).sample.chunk(2)
            eps = eu + guidance * (ec - eu)
        x = sch.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "euler", "unipc"])
def test_all_full_matches_plain_loop_every_sampler(unet, sched_cfg, sampler):
    noise = _noise((2, 1, 16, 16))
    ref = _plain_loop(unet, sampler, 9, noise, sched_cfg)
    ours = sample(unet, sched_cfg, Schedule.full(sampler, 9), noise).images
    assert (ours - ref).abs().max() <= 1e-5


def test_all_full_conditional_with_guidance_matches_plain_loop(cond_unet, sched_cfg):
    noise = _noise((2, 4, 8, 8))
    ehs = torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = _plain_loop(cond_unet, "ddim", 6, noise, sched_cfg, ehs, guidance=3.0)
    ours = sample(cond_unet, sched_cfg, Schedule.full("ddim", 6), noise,
                  cond=Conditioning(ehs, guidance_scale=3.0)).images
    assert (ours - ref).abs().max() <= 1e-5


def _unet_args(model):
    g = torch.Generator().manual_seed(5)
    c = model.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    kw = {}
    if hasattr(c, "cross_attention_dim") and c.cross_attention_dim:
        kw["encoder_hidden_states"] = torch.randn(2, 5, c.cross_attention_dim, generator=g)
    return x, torch.tensor([417, 417]), kw


@pytest.mark.parametrize("which", ["unet", "cond_unet"])
def test_partial_with_cache_from_same_timestep_equals_full(which, request):
    model = request.getfixturevalue(which)
    x, t, kw = _unet_args(model)
    k = anatomy(model).num_branches
    schedule = Schedule("ddim", (FULL,) + tuple(partial(b) for b in range(k)))
    with StepEngine(model, schedule):
        full = model(x, t, **kw).sample
        for b in range(k):
            assert torch.equal(model(x, t, **kw).sample, full), f"branch {b}"


@pytest.mark.parametrize("which", ["unet", "cond_unet"])
def test_partial_step_with_other_input_uses_cache_and_differs(which, request):
    """Deep features really come from the cache: a partial step on new input is not a full step."""
    model = request.getfixturevalue(which)
    x, t, kw = _unet_args(model)
    x2 = x + 0.5
    with torch.no_grad():
        full2 = model(x2, t, **kw).sample
    with StepEngine(model, Schedule("ddim", (FULL, partial(0)))):
        model(x, t, **kw)
        part2 = model(x2, t, **kw).sample
    assert not torch.allclose(part2, full2, atol=1e-4)


def test_partial_step_does_not_run_deep_layers(unet):
    x, t, _ = _unet_args(unet)
    calls = {"mid": 0, "deep_down": 0, "shallow_up": 0}
    unet.mid_block.resnets[0].conv1.register_forward_hook(lambda *a: calls.__setitem__("mid", calls["mid"] + 1))
    unet.down_blocks[2].resnets[0].conv1.register_forward_hook(
        lambda *a: calls.__setitem__("deep_down", calls["deep_down"] + 1))
    unet.up_blocks[2].resnets[1].conv1.register_forward_hook(
        lambda *a: calls.__setitem__("shallow_up", calls["shallow_up"] + 1))
    with StepEngine(unet, Schedule("ddim", (FULL, partial(0), partial(0), NULL))):
        for _ in range(4):
            unet(x, t)
    assert calls == {"mid": 1, "deep_down": 1, "shallow_up": 3}


def test_null_step_returns_last_prediction_without_network_call(unet):
    x, t, _ = _unet_args(unet)
    seen = []
    unet.conv_in.register_forward_hook(lambda *a: seen.append(1))
    with StepEngine(unet, Schedule("ddim", (FULL, NULL, NULL))):
        first = unet(x, t).sample
        again = unet(x * 3, t - 100).sample
    assert len(seen) == 1 and torch.equal(first, again)


def test_detach_restores_model(unet):
    x, t, _ = _unet_args(unet)
    with torch.no_grad():
        before = unet(x, t).sample
    engine = apply_schedule(unet, Schedule("ddim", (FULL, partial(1), NULL)))
    unet(x, t), unet(x + 1, t)
    engine.detach()
    assert _no_flexdiff_hooks(unet)
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, before)
        assert torch.equal(unet(x + 1, t).sample, unet(x + 1, t).sample)


def test_same_schedule_and_seed_give_identical_samples(unet, sched_cfg):
    s = Schedule("dpmsolver++", (FULL, partial(1), NULL, FULL, partial(3), partial(0), NULL, FULL))
    ra = sample(unet, sched_cfg, s, initial_noise(3, (1, 16, 16), seed=4), batch_size=2)
    b = sample(unet, sched_cfg, s, initial_noise(3, (1, 16, 16), seed=4), batch_size=2).images
    a = ra.images
    assert torch.equal(a, b)
    assert ra.calls == {"full": 2 * 3, "partial": 2 * 3, "null": 2 * 2}  # two batches
    assert torch.isfinite(a).all()


def test_batches_are_independent_runs(unet, sched_cfg):
    """Sampling in batches resets the engine and the solver between them: same as one batch."""
    s = Schedule("dpmsolver++", (FULL, partial(2), NULL, FULL, NULL))
    noise = initial_noise(6, (1, 16, 16), seed=2)
    whole = sample(unet, sched_cfg, s, noise, batch_size=6).images
    split = sample(unet, sched_cfg, s, noise, batch_size=4).images
    # equal up to float32 rounding: kernels block a batch of 4 and one of 6 differently (and by the thread count an
    # earlier test left), so sums round apart at ~1e-7 of the samples' scale (this random UNet's reach hundreds); a
    # state leak between batches is of the order of the samples themselves
    assert (whole - split).abs().max() <= 1e-5 * whole.abs().max()


def test_applied_to_a_pipeline_matches_own_sampler_and_repeats(unet, sched_cfg):
    """The step counter wraps after a run, so consecutive pipeline calls are independent."""
    s = Schedule.deepcache("ddim", 10, 3, 2)
    pipe = DDIMPipeline(unet, make_scheduler("ddim", sched_cfg))
    with apply_schedule(pipe, s):
        outs = [
            pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=10,
                 eta=0.0, output_type="np").images
            for _ in range(2)
        ]
    ours = sample(unet, sched_cfg, s, _noise((2, 1, 16, 16))).images
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(outs[0] - outs[1]).max() == 0
    assert abs(outs[0] - ours).max() <= 1e-5
    assert _no_flexdiff_hooks(unet)


def test_refuses_schedule_that_does_not_fit(unet):
    k = anatomy(unet).num_branches
    with pytest.raises(FlexdiffError, match=f"branches 0..{k - 1}"):
        StepEngine(unet, Schedule("ddim", (FULL, partial(k))))


def test_refuses_double_application(unet):
    with apply_schedule(unet, Schedule.full("ddim", 2)):
        with pytest.raises(FlexdiffError, match="already has a flexdiff schedule"):
            apply_schedule(unet, Schedule.full("ddim", 2))


def test_anatomy_counts_skip_connections():
    """One branch per skip tensor of the down path, for 1 and 2 ResNet blocks per level."""
    for lpb in (1, 2):
        model = tiny_unet(layers_per_block=lpb)
        seen = []  # the skip tensors the real forward produces, per down block
        hooks = [b.register_forward_hook(lambda m, a, out: seen.append(len(out[1]))) for b in model.down_blocks]
        model(torch.zeros(1, 1, 16, 16), torch.tensor([3]))
        for h in hooks:
            h.remove()
        assert anatomy(model).num_branches == 1 + sum(seen)  # + conv_in's output


def test_pipeline_with_wrong_step_count_or_scheduler_is_refused(unet, sched_cfg):
    pipe = DDIMPipeline(unet, make_scheduler("ddim", sched_cfg))
    with apply_schedule(pipe, Schedule.deepcache("ddim", 10, 2, 0)):
        with pytest.raises(FlexdiffError, match="has 10 steps but the pipeline runs 7"):
            pipe(batch_size=1, num_inference_steps=7, output_type="np")
    with apply_schedule(pipe, Schedule.full("dpmsolver++", 5)):
        with pytest.raises(FlexdiffError, match="made for dpmsolver\\+\\+"):
            pipe(batch_size=1, num_inference_steps=5, output_type="np")
    assert _no_flexdiff_hooks(unet)


def test_timesteps_beyond_the_training_range_and_non_finite_samples_are_refused(unet, sched_cfg):
    from flexdiff.errors import FlexdiffError

    s = Schedule("dpmsolver++", (FULL, FULL), timesteps=(1500, 200))
    with pytest.raises(FlexdiffError, match="beyond the model's training range 0..999"):
        sample(unet, sched_cfg, s, _noise((1, 1, 16, 16)))
    broken = copy.deepcopy(unet)
    with torch.no_grad():
        broken.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FlexdiffError, match="not finite"):
        sample(broken, sched_cfg, Schedule.full("ddim", 2), _noise((2, 1, 16, 16)))
