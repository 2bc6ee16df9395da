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
    elastic.apply_importance({n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()},
                             probe_losses=[float(v) for v in torch.rand(elastic.num_blocks, generator=g)])
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


def test_importance_reorders_without_changing_the_function_and_slicing_keeps_the_most_important():
    model = build_default_transformer(seed=0).eval()
    elastic = ElasticTransformer(model)
    kw = _inputs()
    with torch.no_grad():
        before = model(**kw).sample
    full_q = model.transformer_blocks[0].attn.to_q.weight.detach().clone()
    full_mlp = model.single_transformer_blocks[0].proj_mlp.weight.detach().clone()
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    grads["transformer_blocks.0.attn.to_q.weight"][48:72] = 1.0  # head 2 is the important one
    grads["x_embedder.weight"][[5, 90]] = 1.0  # residual channels 5 and 90
    grads["single_transformer_blocks.0.proj_mlp.weight"][300] = 1.0  # one hidden unit of one MLP
    elastic.apply_importance(grads, probe_losses=[8, 7, 6, 5, 4, 3, 2, 1])  # the last blocks cost least to drop
    with torch.no_grad():
        assert torch.allclose(model(**kw).sample, before, atol=1e-5)  # only permuted
    assert elastic.drop_order[0] == 7 and elastic.depth_options()[1] == (1, 1, 1, 1, 1, 1, 1, 0)
    state = elastic.sub_state(SubnetSpec((24,), elastic.full.depths))
    q = state["transformer_blocks.0.attn.to_q.weight"]  # one head kept: head 2, over residual channels 5 and 90 first
    assert torch.equal(q[:, :2], full_q[48:72][:, [5, 90]])
    assert torch.equal(state["single_transformer_blocks.0.proj_mlp.weight"][0, :2], full_mlp[300, [5, 90]])
    rebuilt = ElasticTransformer(build_default_transformer(seed=0))
    rebuilt.load_extra_state(elastic.extra_state())
    assert rebuilt.drop_order == elastic.drop_order
    with pytest.raises(FlexdiffError, match="not a permutation of the 8 blocks"):
        rebuilt.load_extra_state({"drop_order": [0, 0, 1]})


def test_each_probe_drops_one_block():
    elastic = ElasticTransformer(build_default_transformer(seed=0).eval())
    probes = elastic.probe_specs()
    assert [p.depths.index(0) for p in probes] == list(range(8)) and all(sum(p.depths) == 7 for p in probes)
    with torch.no_grad():
        out = elastic.probe(probes[0], (), _inputs())  # the first dual block alone dropped: outside the options
    assert out.sample.shape == (2, 64, 4)


def test_bad_settings_are_refused_with_the_accepted_values():
    elastic = ElasticTransformer(build_default_transformer(seed=0))
    with pytest.raises(FlexdiffError, match=r"whole heads of 24: accepted \[24, 48, 72, 96\]"):
        elastic.validate(SubnetSpec((50,), elastic.full.depths))
    with pytest.raises(FlexdiffError, match="one keep flag per block, 8 blocks"):
        elastic.validate(SubnetSpec((96,), (1, 1, 1)))
    with pytest.raises(FlexdiffError, match="one keep flag per block"):
        elastic.validate(SubnetSpec((96,), (0, 0, 1, 1, 1, 1, 1, 1)))  # FLUX's dual stack may not be emptied
    with pytest.raises(FlexdiffError, match="block scores: 3 given, the model has 8 blocks"):
        elastic.apply_importance({}, probe_losses=[1.0, 2.0, 3.0])
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


def test_the_experts_pipeline_on_a_flux_transformer_end_to_end(tmp_path):
    """Intervals, elastic experts (flow matching, label tokens), the agent, extraction and fine-tuning: a mixture
    folder of stock FLUX transformers that loads, routes by the scheduler's timestep and samples; each expert loads
    alone with from_pretrained; a swapped expert is refused."""
    import json
    import shutil

    from flexdiff.experts.pipeline import ExpertsConfig, ExpertsPipeline
    from flexdiff.mixture import Mixture
    from flexdiff.models import DEFAULT_LABEL_TOKENS, load_model, save_model
    from flexdiff.samplers import FLOW_SCHEDULER_CONFIG
    from flexdiff.sampling import initial_noise, sample
    from flexdiff.schedule import Schedule

    save_model(build_default_transformer(seed=0), dict(FLOW_SCHEDULER_CONFIG), tmp_path / "model", DEFAULT_LABEL_TOKENS)
    model = load_model(tmp_path / "model")
    cfg = ExpertsConfig(k=2, sim_timesteps=6, sim_images=16, importance_batches=1, elastic_steps=2, agent_steps=2,
                        final_steps=2, batch_size=8, budget=0.6, num_steps=20, sampler="flow-euler")
    pipe = ExpertsPipeline(model, tmp_path / "exp", cfg)
    out = pipe.run()
    man = json.loads((out / "mixture.json").read_text())
    assert man["model_class"] == "FluxTransformer2DModel" and man["fraction_of_teacher"] <= 0.6 + 1e-9
    summaries = [json.loads((tmp_path / "exp" / "elastic" / f"expert_{k}" / "summary.json").read_text()) for k in (0, 1)]
    assert all(sorted(s["elastic"]["drop_order"]) == list(range(8)) for s in summaries)  # each its own scored order
    mix = load_model(out)
    assert isinstance(mix.unet, Mixture) and mix.unet.experts[0].flexdiff_label_tokens == DEFAULT_LABEL_TOKENS
    for e, spec in zip(mix.unet.experts, man["experts"]):
        assert e.config.num_attention_heads * 24 == spec["spec"]["widths"][0]
        assert e.config.num_layers + e.config.num_single_layers == sum(spec["spec"]["depths"])
        alone = FluxTransformer2DModel.from_pretrained(out / spec["folder"])
        assert sum(p.numel() for p in alone.parameters()) == spec["parameters"]
    kw = _inputs()
    lo, hi = mix.unet.intervals.bounds()[1]
    kw["timestep"] = torch.full((2,), (lo + hi) / 2 / 1000)  # FLUX is called at t / 1000: routed at t
    with torch.no_grad():
        assert torch.equal(mix.unet(**kw).sample, mix.unet.experts[1](**kw).sample)
        kw["timestep"] = torch.tensor([lo / 2 / 1000, (lo + hi) / 2 / 1000])  # one row in each interval
        both = mix.unet(**kw).sample
        first = {k: (v[:1] if k not in ("img_ids", "txt_ids") else v) for k, v in kw.items()}
        assert torch.allclose(both[:1], mix.unet.experts[0](**first).sample, atol=1e-6)
    images = sample(mix.unet, mix.scheduler_config, Schedule.full("flow-euler", 20), initial_noise(2, (1, 16, 16), 0)).images
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    # the baselines at the mixture's MACs: one width for every expert (full depth), and one model for all timesteps
    # with whole blocks dropped (TinyFusion-style, full width)
    from flexdiff.experts.baselines import pruned_baseline, uniform_experts

    uniform = json.loads((uniform_experts(pipe) / "mixture.json").read_text())
    assert len({json.dumps(e["spec"]) for e in uniform["experts"]}) == 1
    assert all(e["spec"]["depths"] == [1] * 8 for e in uniform["experts"])
    pruned = load_model(pruned_baseline(pipe)).unet
    assert pruned.config.num_attention_heads == 4 and pruned.config.num_layers + pruned.config.num_single_layers < 8
    assert pruned.flexdiff_label_tokens == DEFAULT_LABEL_TOKENS
    swapped = tmp_path / "swapped"
    shutil.copytree(out, swapped)
    m = json.loads((swapped / "mixture.json").read_text())
    m["experts"][0]["folder"], m["experts"][1]["folder"] = m["experts"][1]["folder"], m["experts"][0]["folder"]
    (swapped / "mixture.json").write_text(json.dumps(m))
    with pytest.raises(FlexdiffError, match="experts swapped or replaced"):  # its shape, or else its weights
        load_model(swapped)


def test_the_intervals_command_takes_a_transformer_and_experts_refuses_a_sampler_it_cannot_use(tmp_path):
    from flexdiff.models import DEFAULT_LABEL_TOKENS, save_model
    from flexdiff.samplers import FLOW_SCHEDULER_CONFIG
    from test_cli import assert_user_error, run

    save_model(build_default_transformer(seed=0), dict(FLOW_SCHEDULER_CONFIG), tmp_path / "model", DEFAULT_LABEL_TOKENS)
    code, out = run("experts", "--model", tmp_path / "model", "--out", tmp_path / "e", "--sampler", "ddim")
    assert_user_error(code, out, "--sampler ddim: this is a flow-matching model; its samplers are flow-euler")
    assert not (tmp_path / "e").exists()  # refused before anything was written
    code, out = run("intervals", "--model", tmp_path / "model", "--out", tmp_path / "iv", "--k", "2", "--timesteps", "4",
                    "--images", "8")
    assert code == 0, out
    assert (tmp_path / "iv" / "intervals.json").exists() and (tmp_path / "iv" / "similarity.png").exists()


def test_a_partial_schedule_runs_on_a_mixture_of_transformers_of_other_depths(tmp_path):
    """A mixture's experts cut one branch at other blocks (a 4-block expert's (1, 1) ends at block 3, an 8-block
    one's at block 7): every expert's full steps record its own boundaries. They recorded only the shallowest
    expert's, and a partial step on the deeper expert found nothing cached (the composed search crashed)."""
    from flexdiff.anatomy import noise_shape
    from flexdiff.engine import StepEngine
    from flexdiff.mixture import Intervals, save_mixture
    from flexdiff.models import DEFAULT_LABEL_TOKENS, load_model, save_model
    from flexdiff.samplers import FLOW_SCHEDULER_CONFIG
    from flexdiff.sampling import initial_noise, model_conditioning, sample
    from flexdiff.schedule import Schedule

    deep = load_model(save_model(build_default_transformer(0), FLOW_SCHEDULER_CONFIG, tmp_path / "d",
                                 DEFAULT_LABEL_TOKENS)).unet
    shallow = load_model(save_model(build_default_transformer(1, num_layers=1, num_single_layers=3),
                                    FLOW_SCHEDULER_CONFIG, tmp_path / "s", DEFAULT_LABEL_TOKENS)).unet
    save_mixture([deep, shallow], Intervals((0, 500), 1000), [SubnetSpec((96,), (1,) * 8), SubnetSpec((96,), (1,) * 4)],
                 FLOW_SCHEDULER_CONFIG, tmp_path / "mix")
    mix = load_model(tmp_path / "mix")
    noise = initial_noise(3, noise_shape(mix.unet), 0)
    schedule = Schedule.deepcache("flow-euler", 8, 2, 0)  # full, partial, ...: partial steps in both intervals
    assert StepEngine(mix.unet, schedule).needed == {1, 3, 7}  # (1, 1) on each expert: blocks 1 and 3, 1 and 7
    out = sample(mix.unet, mix.scheduler_config, schedule, noise, cond=model_conditioning(mix, 3))
    assert torch.isfinite(out.images).all() and out.calls["partial"] == 4
