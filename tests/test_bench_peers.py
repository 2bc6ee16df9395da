"""diffusers' cache hooks as bench peers on a (tiny, FLUX-shaped) transformer: each runs through the public API,
its MACs are counted from what ran (never above the plain run it decides over), and bad settings or a model the
hooks cannot run on are refused before anything is written."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flexdiff.bench.peers import PEER_KINDS, HookPeer, PeerRunner
from flexdiff.errors import FlexdiffError
from flexdiff.models import DEFAULT_LABEL_TOKENS, LoadedModel, build_default_transformer, save_model
from flexdiff.samplers import FLOW_SCHEDULER_CONFIG
from flexdiff.sampling import class_conditioning, initial_noise, sample
from test_cli import assert_user_error, run  # noqa: E402

SETTING = {"fbc": 0.5, "taylorseer": 2, "magcache": 0.5, "pab": 2, "fastercache": 2}


def test_every_hook_runs_and_counts_no_more_than_the_plain_run():
    model = build_default_transformer(0, num_layers=1, num_single_layers=3).eval().requires_grad_(False)
    noise = initial_noise(8, (1, 16, 16), 0)
    cond = class_conditioning(model, (0, 1), 8, 2.0)
    loaded = LoadedModel(unet=model, scheduler_config=FLOW_SCHEDULER_CONFIG, path=None)
    with FlopCounterMode(display=False) as fc:
        sample(model, FLOW_SCHEDULER_CONFIG, HookPeer("fbc", 0.5, 6).base, noise[:4], 4, cond=cond.rows(0, 4))
    plain = fc.get_total_flops() / 2 / 4
    runner = PeerRunner(loaded, noise, cond, batch_size=4)
    for kind in PEER_KINDS:
        r = runner.run(HookPeer(kind, SETTING[kind], 6))
        assert r.images.shape == (8, 1, 16, 16) and torch.isfinite(r.images).all(), kind
        assert len(r.macs) == 2 and all(0 < m <= plain * (1 + 1e-9) for m in r.macs), (kind, r.macs, plain)
        assert r.seconds > 0
    assert not getattr(model, "_diffusers_hook", None) or not model._diffusers_hook.hooks  # the model is untouched


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_the_counted_macs_equal_torchs_flop_counter_around_the_hooked_run(guidance):
    """MacsCounter (module calls that ran x each module's own MACs) against torch's FLOP counter around the very same
    hooked run, for every hook, guided (a doubled batch) and not, and with a smaller last batch."""
    from flexdiff.bench.peers import _hooked_copy, _reset, calibrate_magcache

    model = build_default_transformer(0, num_layers=1, num_single_layers=3).eval().requires_grad_(False)
    noise = initial_noise(6, (1, 16, 16), 0)
    cond = class_conditioning(model, (0, 1), 6, guidance) if guidance != 1.0 else None
    with FlopCounterMode(display=False) as fc:
        sample(model, FLOW_SCHEDULER_CONFIG, HookPeer("fbc", 0.5, 8).base, noise[:4], 4,
               cond=cond.rows(0, 4) if cond is not None else None)
    plain, skipped = fc.get_total_flops() / 2, set()
    for kind in PEER_KINDS:
        peer = HookPeer(kind, SETTING[kind], 8)
        ratios = calibrate_magcache(model, FLOW_SCHEDULER_CONFIG, peer, noise[:4],
                                    cond.rows(0, 4) if cond is not None else None) if kind == "magcache" else None
        m, counter = _hooked_copy(model, peer, ratios, count=True)
        for start, size in ((0, 4), (4, 2)):
            _reset(m)
            counter.start()
            with FlopCounterMode(display=False) as fc:
                sample(m, FLOW_SCHEDULER_CONFIG, peer.base, noise[start:start + size], size,
                       cond=cond.rows(start, start + size) if cond is not None else None)
            assert counter.macs() == pytest.approx(fc.get_total_flops() / 2, rel=1e-9), (kind, size)
            if size == 4 and counter.macs() < plain * 0.99:
                skipped.add(kind)
    assert len(skipped) >= 3, skipped  # the hooks did skip work: the counts are not those of a plain run


@pytest.mark.parametrize("kind, setting", [("fbc", 0.0), ("fbc", 1.5), ("taylorseer", 2.5), ("pab", 1), ("nope", 1)])
def test_settings_out_of_range_are_refused(kind, setting):
    with pytest.raises(FlexdiffError):
        HookPeer(kind, setting, 10)


def test_bench_refuses_bad_hooks_and_hooks_on_a_unet_before_writing(tmp_path):
    code, out = run("bench", "--hooks", "fbc:2", "--out", tmp_path / "b")
    assert_user_error(code, out, "--hooks fbc:2", "between 0 and 1")
    code, out = run("bench", "--preset", "transformer", "--out", tmp_path / "b")  # the default model is a UNet
    assert_user_error(code, out, "diffusers' cache hooks run on transformers", "--hooks none")
    assert not (tmp_path / "b").exists()
    folder = save_model(build_default_transformer(0, num_layers=1, num_single_layers=3), FLOW_SCHEDULER_CONFIG,
                        tmp_path / "t", DEFAULT_LABEL_TOKENS)
    code, out = run("bench", "--model", folder, "--hooks", "taylorseer:x", "--out", tmp_path / "b")
    assert_user_error(code, out, "KIND:SETTING")


def test_the_transformer_table_end_to_end_on_a_tiny_flux(tmp_path):
    """make bench's second table, shrunk: the teacher, plain flow solvers, FORA-style caches, the five hooks (MACs
    counted per batch), a Flexiffusion search; every searched schedule paired with each hook at the MACs it spent
    or more; the table, plot and grid written."""
    import dataclasses
    import json

    from flexdiff.bench.methods import PRESETS
    from flexdiff.bench.run import run_bench
    from flexdiff.metrics import QualityMeter
    from flexdiff.models import load_model

    folder = save_model(build_default_transformer(0, num_layers=1, num_single_layers=3), FLOW_SCHEDULER_CONFIG,
                        tmp_path / "t", DEFAULT_LABEL_TOKENS)
    model = load_model(folder)
    cfg = dataclasses.replace(PRESETS["transformer-quick"], samples=8, batch_size=8, teacher_steps=8, hook_steps=8,
                              ddim_steps=(2,), dpm_steps=(2,), deepcache_dpm_steps=(4,), search_budgets=(1 / 2,),
                              search_population=2, search_generations=1, search_eval_samples=8)
    result = run_bench(model, cfg, tmp_path / "b", QualityMeter.for_model((1, 16, 16), n_boot=10))
    rows = {r["method"]: r for r in result["rows"]}
    assert not result["skipped"], result["skipped"]
    hooks = [r for r in rows.values() if r["family"].startswith("hook-")]
    assert sorted(r["family"] for r in hooks) == sorted(f"hook-{k}" for k in PEER_KINDS)
    teacher_macs = rows["teacher flow-Euler-8"]["macs_per_image"]
    for r in hooks:
        assert len(r["macs_per_batch"]) == 1 and 0 < r["macs_per_image"] <= teacher_macs * (1 + 1e-9)
    assert any(r["family"] == "fora" for r in rows.values())
    searched = [r for r in rows.values() if r["family"] == "flexiffusion"]
    assert len(searched) == 1 and searched[0]["macs_per_image"] <= teacher_macs / 2 * (1 + 1e-9)
    # every hook that spent at least the schedule's MACs at some setting meets it, with the rule's verdict
    spent_more = {r["family"] for r in hooks if r["macs_per_image"] >= searched[0]["macs_per_image"]}
    pairs = [c for c in result["search_vs_peers"] if c["peer_family"].startswith("hook-")]
    assert spent_more and spent_more <= {c["peer_family"] for c in pairs}
    assert all({"verdict", "class_tv_difference"} <= set(c) for c in pairs)
    table = (tmp_path / "b" / "bench.md").read_text()
    assert "FirstBlockCache" in table and "FORA-style" in table
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]
    assert (tmp_path / "b" / "bench.png").exists() and (tmp_path / "b" / "samples.png").exists()


def test_the_transformer_tables_mixture_rows_on_a_tiny_flux(tmp_path):
    """The full transformer preset builds a mixture of FLUX experts with both baselines (uniform width,
    TinyFusion-style) and searches a schedule over it, all on flow Euler, the teacher's sampler."""
    import dataclasses

    from flexdiff.bench.methods import PRESETS
    from flexdiff.bench.run import run_bench
    from flexdiff.metrics import QualityMeter
    from flexdiff.models import load_model

    folder = save_model(build_default_transformer(0, num_layers=1, num_single_layers=3), FLOW_SCHEDULER_CONFIG,
                        tmp_path / "t", DEFAULT_LABEL_TOKENS)
    small = (("k", 2), ("sim_timesteps", 4), ("sim_images", 8), ("importance_batches", 1), ("elastic_steps", 1),
             ("agent_steps", 1), ("final_steps", 1), ("batch_size", 4))
    cfg = dataclasses.replace(PRESETS["transformer"], samples=8, batch_size=8, teacher_steps=8, ddim_steps=(),
                              dpm_steps=(), unipc_steps=(), deepcache_intervals=(), deepcache_dpm_steps=(),
                              delta_dit_intervals=(), hook_peers=(), search_budgets=(), expert_budgets=(0.7,),
                              composed_speedups=(2,), search_population=2, search_generations=1,
                              search_eval_samples=8, expert_settings=small)
    result = run_bench(load_model(folder), cfg, tmp_path / "b", QualityMeter.for_model((1, 16, 16), n_boot=10))
    families = {r["family"]: r["method"] for r in result["rows"]}
    assert {"teacher", "experts", "diff-pruning", "experts+search"} <= set(families)
    # the uniform-width experts were built (a row of their own unless they came out the very same model)
    assert list((tmp_path / "b" / "experts").glob("*/budget-0.7/uniform/mixture.json"))
    assert "TinyFusion-style" in families["diff-pruning"] and "flow-Euler-8" in families["experts"]
    assert result["mixture_vs_baselines"]
