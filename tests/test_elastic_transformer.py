"""The elastic transformer (issue 27): sub-networks of a FLUX-shaped model in depth (which blocks) and width (whole
heads), run through the full weights and cut out into stock diffusers models that are the same function."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from flexdiff.errors import FlexdiffError
from flexdiff.experts.elastic_transformer import ElasticTransformer
from flexdiff.mixture import SubnetSpec
from flexdiff.models import build_default_transformer


def _inputs(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(n, 64, 4, generator=g), encoder_hidden_states=torch.randn(n, 1, 11, generator=g),
                pooled_projections=torch.randn(n, 11, generator=g), timestep=torch.tensor([0.3, 0.7][:n]),
                img_ids=torch.randn(64, 3, generator=g), txt_ids=torch.zeros(1, 3))


@pytest.fixture(scope="module")
def scored():
    model = build_default_transformer(seed=0).eval()
    elastic = ElasticTransformer(model)
    g = torch.Generator().manual_seed(1)
    elastic.set_scores({n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()},
                       block_scores=[float(v) for v in torch.rand(elastic.num_blocks, generator=g)])
    return elastic


def test_the_full_setting_is_the_model_itself():
    model = build_default_transformer(seed=0).eval()
    elastic = ElasticTransformer(model)
    kw = _inputs()
    with torch.no_grad():
        assert torch.equal(elastic(**kw, spec=elastic.full).sample, model(**kw).sample)
        # the full width through the slicing path (one block dropped) keeps every channel: same as dropping the block
        # from a copy of the model by hand
        spec = SubnetSpec((elastic.width,), elastic.depth_options()[1])
        dropped = spec.depths.index(0)
        assert dropped == elastic.drop_order[0]
        by_hand = build_default_transformer(seed=0).eval()
        stack = by_hand.single_transformer_blocks if dropped >= 2 else by_hand.transformer_blocks
        del stack[dropped - 2 if dropped >= 2 else dropped]
        assert torch.allclose(elastic(**kw, spec=spec).sample, by_hand(**kw).sample, atol=1e-6)


def test_an_extracted_sub_network_is_the_same_function_and_loads_alone(scored, tmp_path):
    kw = _inputs()
    options = scored.depth_options()
    sizes = []
    for spec in (SubnetSpec((72,), options[2]), SubnetSpec((96,), options[3]), scored.smallest()):
        with torch.no_grad():
            expected = scored(**kw, spec=spec).sample
            extracted = scored.extract(spec)
            assert torch.equal(extracted(**kw).sample, expected)
        assert extracted.config.num_attention_heads == spec.widths[0] // 24
        assert extracted.config.num_layers + extracted.config.num_single_layers == sum(spec.depths)
        folder = tmp_path / spec.label().replace("/", "_")
        extracted.save_pretrained(folder)
        reloaded = FluxTransformer2DModel.from_pretrained(folder).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(**kw).sample, expected)
        sizes.append(sum(p.numel() for p in extracted.parameters()))
    assert sizes[2] < sizes[0] < sizes[1] < sum(p.numel() for p in scored.unet.parameters())


def test_gradients_of_a_sub_network_reach_only_the_kept_slices_of_the_full_weights():
    model = build_default_transformer(seed=0)
    elastic = ElasticTransformer(model)
    spec = SubnetSpec((48,), elastic.depth_options()[2])
    elastic(**_inputs(), spec=spec).sample.square().mean().backward()
    dropped = [k for k, keep in enumerate(spec.depths) if not keep]
    for k in dropped:
        block = model.transformer_blocks[k] if k < 2 else model.single_transformer_blocks[k - 2]
        assert all(p.grad is None or not p.grad.any() for p in block.parameters())
    q = model.single_transformer_blocks[[k for k in range(2, 8) if spec.depths[k]][0] - 2].attn.to_q.weight.grad
    assert q[:48].abs().sum() > 0 and not q[48:].any()  # unscored: the first two heads and residual channels
    assert not q[:, 48:].any()


def test_the_most_important_heads_blocks_and_units_are_kept():
    model = build_default_transformer(seed=0)
    elastic = ElasticTransformer(model)
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    grads["transformer_blocks.0.attn.to_q.weight"][48:72] = 1.0  # head 2 is the important one
    grads["x_embedder.weight"][[5, 90]] = 1.0  # residual channels 5 and 90
    elastic.set_scores(grads, block_scores=[8, 7, 6, 5, 4, 3, 2, 1])  # the last blocks matter least
    assert elastic.drop_order[0] == 7 and elastic.depth_options()[1] == (1, 1, 1, 1, 1, 1, 1, 0)
    state = elastic.sub_state(SubnetSpec((24,), elastic.full.depths))
    full_q = model.transformer_blocks[0].attn.to_q.weight
    kept_residual = torch.sort(torch.argsort(-elastic.scores["R"], stable=True)[:24]).values
    assert {5, 90} <= set(kept_residual.tolist())
    assert torch.equal(state["transformer_blocks.0.attn.to_q.weight"], full_q[48:72][:, kept_residual])


def test_bad_settings_are_refused_with_the_accepted_values():
    elastic = ElasticTransformer(build_default_transformer(seed=0))
    with pytest.raises(FlexdiffError, match=r"whole heads of 24: accepted \[24, 48, 72, 96\]"):
        elastic.validate(SubnetSpec((50,), elastic.full.depths))
    with pytest.raises(FlexdiffError, match="one keep flag per block, 8 blocks"):
        elastic.validate(SubnetSpec((96,), (1, 1, 1)))
    with pytest.raises(FlexdiffError, match="one keep flag per block"):
        elastic.validate(SubnetSpec((96,), (0, 0, 1, 1, 1, 1, 1, 1)))  # FLUX's dual stack may not be emptied
    with pytest.raises(FlexdiffError, match="block scores: 3 given, the model has 8 blocks"):
        elastic.set_scores({}, block_scores=[1.0, 2.0, 3.0])
    from diffusers import UNet2DModel

    with pytest.raises(FlexdiffError, match="UNet2DModel: elastic transformer experts support FluxTransformer2DModel"):
        ElasticTransformer(UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))


def test_the_space_of_sub_networks():
    elastic = ElasticTransformer(build_default_transformer(seed=0))
    options = elastic.depth_options()
    assert options[0] == elastic.full.depths and len(set(options)) == len(options)
    assert all(sum(a) - sum(b) == 1 for a, b in zip(options, options[1:]))  # one block fewer each time
    assert all(any(d[:2]) and any(d[2:]) for d in options)  # each stack keeps a block
    specs = list(elastic.all_specs())
    assert len(specs) == 4 * len(options) and elastic.full in specs and elastic.smallest() in specs
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        elastic.validate(elastic.random_spec(gen))
