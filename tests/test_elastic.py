"""Elastic UNets: full size is the original, a sub-network equals its extracted static model."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from tests.conftest import tiny_cond_unet, tiny_unet

from flexdiff.errors import FlexdiffError
from flexdiff.experts.elastic import ElasticUNet, SubnetSpec, full_spec, stage_scores


def cond_unet_with_elastic_stage(seed: int = 0) -> UNet2DConditionModel:
    """A tiny Stable-Diffusion-like UNet whose middle stage has no cross-attention (so it can be cut)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 24),
        layers_per_block=2, norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval().requires_grad_(False)


def _inputs(unet, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.tensor([37, 410, 880][:n])
    kw = {}
    if isinstance(unet, UNet2DConditionModel):
        kw["encoder_hidden_states"] = torch.randn(n, 5, c.cross_attention_dim, generator=g)
    return x, t, kw


def _random_scores(e, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {i: torch.rand(c, generator=g) for i, c in enumerate(e.full.widths)}


@pytest.mark.parametrize("make", [lambda: tiny_unet(layers_per_block=2), tiny_unet, cond_unet_with_elastic_stage])
def test_full_size_equals_original_after_reordering(make):
    unet = make()
    original = copy.deepcopy(unet)
    e = ElasticUNet(unet)
    x, t, kw = _inputs(unet)
    before = dict(original.named_parameters())
    e.reorder(_random_scores(e))
    moved = sum(not torch.equal(p, before[n]) for n, p in unet.named_parameters())
    assert moved > 0  # the re-ordering really permuted channels
    with torch.no_grad():
        torch.testing.assert_close(e(x, t, spec=e.full, **kw).sample, original(x, t, **kw).sample, atol=1e-5, rtol=0)
        # and the sliced path (functional_call) at full size is the same function too
        full_sliced = e.template(e.full)
        out = torch.func.functional_call(full_sliced, e.sub_state(e.full), (x, t), kw).sample
        torch.testing.assert_close(out, original(x, t, **kw).sample, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [lambda: tiny_unet(layers_per_block=2), cond_unet_with_elastic_stage])
def test_sub_network_equals_extracted_static_model(make, tmp_path):
    unet = make()
    e = ElasticUNet(unet)
    e.reorder(_random_scores(e))
    x, t, kw = _inputs(unet)
    gen = torch.Generator().manual_seed(3)
    specs = {e.smallest()} | {e.random_spec(gen) for _ in range(4)}
    assert any(s.depths != e.full.depths for s in specs) or len(e.depth_options()) == 1
    for spec in specs:
        static = e.extract(spec)
        assert type(static) is type(unet)
        assert list(static.config.block_out_channels) == list(spec.widths)
        static.save_pretrained(tmp_path / spec.label().replace("/", "_"), safe_serialization=True)
        loaded = type(unet).from_pretrained(tmp_path / spec.label().replace("/", "_"), use_safetensors=True).eval()
        with torch.no_grad():
            want = e(x, t, spec=spec, **kw).sample
            torch.testing.assert_close(static(x, t, **kw).sample, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(loaded(x, t, **kw).sample, want, atol=1e-5, rtol=0)
        n_static = sum(p.numel() for p in static.parameters())
        assert n_static <= sum(p.numel() for p in unet.parameters())


def test_depth_cut_keeps_the_skips_that_match():
    unet = tiny_unet(layers_per_block=2)
    e = ElasticUNet(unet)
    assert e.depth_options() == [(1, 1, 1), (2, 2, 2)]
    spec = SubnetSpec(e.full.widths, (1, 1, 1))
    static = e.extract(spec)
    assert static.config.layers_per_block == 1
    assert len(static.up_blocks[0].resnets) == 2
    # the kept up ResNets are the first (input from below) and the last (the stage's input skip)
    torch.testing.assert_close(static.up_blocks[1].resnets[1].conv1.weight, unet.up_blocks[1].resnets[2].conv1.weight)
    torch.testing.assert_close(static.up_blocks[1].resnets[0].conv1.weight, unet.up_blocks[1].resnets[0].conv1.weight)


def test_gradients_reach_the_full_weights():
    unet = tiny_unet().requires_grad_(True)
    e = ElasticUNet(unet)
    x, t, _ = _inputs(unet)
    e(x, t, spec=e.smallest()).sample.square().mean().backward()
    g = unet.down_blocks[1].resnets[0].conv1.weight.grad
    kept = e.smallest().widths[1]
    assert g is not None and g.abs().sum() > 0
    assert (g.abs().sum(dim=(1, 2, 3)) > 0).sum() == kept  # only the kept output channels learn


def test_width_choices_respect_groups_heads_and_stage0():
    e = ElasticUNet(tiny_unet())
    assert e.width_choices(0) == [8]  # stage 0 is tied to the time embedding's size
    assert all(w % e.groups == 0 for w in e.width_choices(1))
    assert min(e.width_choices(2)) >= 8  # the attention head size
    ce = ElasticUNet(tiny_cond_unet())
    assert ce.width_choices(1) == [16]  # the cross-attention mid block keeps the last stage whole
    ce = ElasticUNet(cond_unet_with_elastic_stage())
    assert ce.width_choices(1) == [4, 8, 12, 16] and ce.width_choices(2) == [24]
    assert (1, 2, 1) in ce.depth_options()  # per-stage depth for UNet2DConditionModel


def test_bad_specs_are_refused():
    e = ElasticUNet(tiny_unet())
    with pytest.raises(FlexdiffError, match="width 10 for stage 1"):
        e.validate(SubnetSpec((8, 10, 16), (1, 1, 1)))
    with pytest.raises(FlexdiffError, match="3 stages"):
        e.validate(SubnetSpec((8, 16), (1, 1)))
    with pytest.raises(FlexdiffError, match="depths"):
        e.validate(SubnetSpec((8, 16, 16), (2, 2, 2)))
    with pytest.raises(FlexdiffError, match="widths"):
        SubnetSpec.from_dict({"widths": [8]}, where="mixture.json experts[0]")


def test_spec_round_trip_and_taylor_scores():
    spec = SubnetSpec((8, 16, 8), (1, 1, 1))
    assert SubnetSpec.from_dict(spec.to_dict()) == spec
    unet = tiny_unet()
    e = ElasticUNet(unet)
    grads = {n: p.detach().abs() for n, p in unet.named_parameters()}
    scores = stage_scores(e, grads)
    assert set(scores) == {0, 1, 2} and all((s > 0).all() for s in scores.values())
    assert full_spec(unet).widths == (8, 16, 16)
    assert isinstance(e.extract(e.full), UNet2DModel)
