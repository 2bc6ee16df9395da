"""Transformer denoisers (DiT, PixArt, SD3, FLUX) cut by the engine: exactness against the model without hooks
and against a hand computation of the partial step, restoration, costs and refusals. Tiny random-weight models."""

import pytest
import torch

from flexdiff.anatomy import anatomy, num_branches
from flexdiff.cost import measure_step_costs
from flexdiff.engine import StepEngine
from flexdiff.errors import FlexdiffError
from flexdiff.schedule import FULL, NULL, Schedule, partial
from flexdiff.transformer_anatomy import transformer_branches
from tiny_transformers import MODELS, inputs

NAMES = list(MODELS)


def _blocks(model):
    out = list(model.transformer_blocks)
    return out + list(getattr(model, "single_transformer_blocks", None) or [])


def _streams(args, kwargs):
    """(hidden, encoder or None) a block was called with, read by the test itself (not through the registry)."""
    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    e = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return h, e


def _pack(block, h, e):
    # BasicTransformerBlock (DiT, PixArt) returns the image tokens; SD3's and FLUX's blocks (text, image)
    return h if type(block).__name__ == "BasicTransformerBlock" else (e, h)


def _hand_partial(model, kw_full, kw_partial, f, b):
    """A partial step at (F, B) computed with plain torch hooks: a full pass at kw_full records the states entering
    block F and block N - B; a pass at kw_partial then replaces block F's output by its input plus that residual
    and makes every other middle block return its input."""
    blocks, seen = _blocks(model), {}
    n = len(blocks)

    def record(k):
        def pre(mod, args, kwargs):
            seen[k] = _streams(args, kwargs)
        return pre

    hs = [blocks[k].register_forward_pre_hook(record(k), with_kwargs=True) for k in (f, n - b)]
    with torch.no_grad():
        model(**kw_full)
    for h in hs:
        h.remove()

    def replace(k):
        def post(mod, args, kwargs, output):
            h, e = _streams(args, kwargs)
            if k == f:
                (h0, e0), (h1, e1) = seen[f], seen[n - b]
                h = h + (h1 - h0)
                e = None if e is None else e + (e1 - e0)
            return _pack(mod, h, e)
        return post

    hs = [blocks[k].register_forward_hook(replace(k), with_kwargs=True) for k in range(f, n - b)]
    with torch.no_grad():
        out = model(**kw_partial).sample
    for h in hs:
        h.remove()
    return out


@pytest.mark.parametrize("name", NAMES)
def test_all_full_is_bit_identical_and_detach_restores(name):
    model = MODELS[name]()
    kws = [inputs(model, seed) for seed in range(3)]
    with torch.no_grad():
        plain = [model(**kw).sample for kw in kws]
        with StepEngine(model, Schedule("flow-euler", (FULL,) * 3)) as engine:
            hooked = [model(**kw).sample for kw in kws]
        after = [model(**kw).sample for kw in kws]
    assert engine.calls == {"full": 3, "partial": 0, "null": 0}
    for a, b, c in zip(plain, hooked, after):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.get_hook("flexdiff_step_engine")
               for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_partial_step_equals_the_hand_computation(name):
    model = MODELS[name]()
    anat = anatomy(model)
    kw1, kw2 = inputs(model, 0), inputs(model, 1)
    for branch in range(anat.num_branches):
        f, b = anat.branches[branch]
        with torch.no_grad(), StepEngine(model, Schedule("flow-euler", (FULL, partial(branch), NULL))) as engine:
            model(**kw1)
            got = model(**kw2).sample
            null = model(**kw2).sample
        want = _hand_partial(model, kw1, kw2, f, b)
        assert torch.allclose(got, want, atol=1e-5), (name, branch, (got - want).abs().max())
        assert torch.equal(null, got)  # a null step makes no call: the last output again
        assert engine.calls == {"full": 1, "partial": 1, "null": 1}
        with torch.no_grad():
            assert (got - model(**kw2).sample).abs().max() > 1e-4  # the partial step is not the full one


def test_branches_are_cheapest_first_and_leave_a_middle():
    for depth in (3, 4, 8, 24, 57):
        pairs = transformer_branches(depth)
        assert pairs and all(f >= 1 and b >= 1 and f + b < depth for f, b in pairs)
        costs = [f + b for f, b in pairs]
        assert costs == sorted(costs)
    assert transformer_branches(8) == ((1, 1), (1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (2, 4), (4, 2))
    assert transformer_branches(2) == ()


@pytest.mark.parametrize("name", NAMES)
def test_partial_steps_cost_less_in_order(name):
    model = MODELS[name]()
    costs = measure_step_costs(model)
    anat = anatomy(model)
    assert len(costs.partial) == anat.num_branches == num_branches(model)
    assert all(0 < p < costs.full for p in costs.partial)
    blocks = [f + b for f, b in anat.branches]
    for i in range(1, len(blocks)):  # more blocks run, more MACs
        if blocks[i] > blocks[i - 1]:
            assert costs.partial[i] > costs.partial[i - 1]


def test_flux_timestep_is_placed_from_the_pipeline_scale():
    """FLUX's pipeline calls the transformer at t / 1000 (here as bfloat16 would round it): still placed."""
    from flexdiff.samplers import FLOW_SCHEDULER_CONFIG, make_scheduler

    model = MODELS["flux"]()
    sched = make_scheduler("flow-euler", FLOW_SCHEDULER_CONFIG)
    schedule = Schedule("flow-euler", (FULL, partial(0), NULL, FULL))
    sched.set_timesteps(4)
    kw = inputs(model, 0)
    with torch.no_grad(), StepEngine(model, schedule, sched) as engine:
        for t in sched.timesteps:
            rounded = (t / 1000).to(torch.bfloat16).float()
            model(**{**kw, "timestep": rounded.expand(2)})
            sched.step(torch.zeros(1), t, torch.zeros(1))
        assert engine.calls == {"full": 2, "partial": 1, "null": 1}


def test_uncuttable_models_are_refused_naming_the_supported_ones():
    from diffusers import UNet1DModel

    for model in (torch.nn.Linear(2, 2), UNet1DModel(block_out_channels=(8, 8), in_channels=2, out_channels=2,
                                                       extra_in_channels=16, down_block_types=("DownBlock1DNoSkip",
                                                       "DownBlock1D"), up_block_types=("UpBlock1D", "UpBlock1DNoSkip"),
                                                       mid_block_type="UNetMidBlock1D", out_block_type=None)):
        with pytest.raises(FlexdiffError) as err:
            anatomy(model)
        msg = str(err.value)
        assert type(model).__name__ in msg and "SD3Transformer2DModel" in msg and "FluxTransformer2DModel" in msg


def test_a_branch_beyond_the_model_is_refused():
    model = MODELS["sd3"]()  # 4 blocks: branches (1, 1), (1, 2), (2, 1)
    with pytest.raises(FlexdiffError, match="branch"):
        StepEngine(model, Schedule("flow-euler", (FULL, partial(3))))
