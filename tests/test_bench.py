"""The bench on a tiny model: every method on the same noise, outputs written, resumable."""

import json

from flexdiff.bench import BenchConfig, run_bench
from flexdiff.fingerprints import weights_fingerprint
from flexdiff.metrics import QualityMeter
from flexdiff.models import load_model
from flexdiff.schedule import FULL, NULL, Schedule, partial

CFG = BenchConfig(samples=12, batch_size=8, teacher_steps=6, ddim_steps=(3,), dpm_steps=(3,),
                  deepcache_intervals=(2,), deepcache_branches=(0, 3), deepcache_nonuniform=(3,),
                  search_budgets=(0.5,), search_population=3, search_generations=1, search_eval_samples=8,
                  flexiffusion_metrics=("distance",))


def test_bench_writes_table_plot_and_resumes(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    meter = QualityMeter.for_model((1, 16, 16), n_boot=20)
    extra = (Schedule("ddim", (FULL, partial(1), NULL, FULL, NULL, NULL), name="searched"),)
    result = run_bench(model, CFG, tmp_path / "b", meter, extra)
    names = [r["method"] for r in result["rows"]]
    assert names[:6] == ["teacher DDIM-6", "DDIM-3", "DPM-Solver++-3", "DeepCache 1:2 b0 (DDIM-6)",
                         "DeepCache 1:2 b3 (DDIM-6)", "DeepCache non-uniform 1:3 b0 (DDIM-6)"]
    assert [r["family"] for r in result["rows"][6:]] == ["flexiffusion", "autodiffusion", "schedule"]
    for r in result["rows"][6:8]:  # the searches kept the budget and say how long they took
        assert r["speedup_macs"] >= 2 - 1e-9 and r["search_seconds"] > 0
    fp = weights_fingerprint(model.unet)  # each model's searches in their own folder
    assert (tmp_path / "b" / "searches" / fp / "flexiffusion-distance-2x" / "best.json").exists()
    for f in ("bench.md", "bench.json", "bench.png", "samples.png"):
        assert (tmp_path / "b" / f).stat().st_size > 0
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["teacher DDIM-6"]["speedup_macs"] == 1.0
    assert rows["DDIM-3"]["speedup_macs"] == 2.0
    assert rows["DeepCache 1:2 b0 (DDIM-6)"]["speedup_macs"] > rows["DeepCache 1:2 b3 (DDIM-6)"]["speedup_macs"] > 1
    assert "rfid" in rows["DDIM-3"]["metrics"] and "rfid" not in rows["teacher DDIM-6"]["metrics"]
    table = (tmp_path / "b" / "bench.md").read_text()
    assert "Samples per method: 12" in table and "| searched |" in table and "Search wall time" in table
    flex = next(r for r in result["rows"] if r["family"] == "flexiffusion")
    within = [r for r in result["rows"] if r["family"] in ("ddim", "dpmsolver++", "deepcache", "deepcache-nu",
              "autodiffusion") and r["macs_per_image"] <= rows["teacher DDIM-6"]["macs_per_image"] / 2 + 1e-6]
    best = {}  # each family's best peer within the budget
    for r in within:
        if r["family"] not in best or r["metrics"]["cbfd"]["value"] < best[r["family"]]["metrics"]["cbfd"]["value"]:
            best[r["family"]] = r
    compared = [c for c in result["search_vs_peers"] if c["schedule"] == flex["method"]]
    assert within and sorted(c["peer"] for c in compared) == sorted(r["method"] for r in best.values())
    for c in compared:  # the rule: a win needs the class mix not separated worse
        assert c["verdict"] in ("better", "worse", "tie", "better headline, worse class mix")
        tv_worse = c["class_tv_difference"]["lo"] > 0
        assert (c["verdict"] == "better") == (c["difference"]["hi"] < 0 and not tv_worse)
    assert {"precision", "recall", "class_tv_minus_teacher"} <= set(rows["DDIM-3"]["metrics"])
    assert "Flexiffusion schedules against the best peer of each family within their budget" in table

    again = run_bench(model, CFG, tmp_path / "b", meter, extra)
    assert all(r["resumed"] for r in again["rows"])
    def strip(res):
        return [(r["method"], r["metrics"]) for r in res["rows"]]
    assert strip(again) == strip(result)
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["rows"][0]["resumed"] is True


def test_rows_timed_under_other_threads_are_redrawn(tiny_model_dir, tmp_path):
    # a bench resumed with another thread count must not put old timings beside new ones in one table
    import torch

    model = load_model(tiny_model_dir)
    meter = QualityMeter.for_model((1, 16, 16), n_boot=20)
    cfg = BenchConfig(samples=8, batch_size=8, teacher_steps=4, ddim_steps=(2,), dpm_steps=(), deepcache_intervals=(),
                      deepcache_nonuniform=())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = run_bench(model, cfg, tmp_path / "b", meter)
        assert not any(r["resumed"] for r in first["rows"])
        assert all(r["resumed"] for r in run_bench(model, cfg, tmp_path / "b", meter)["rows"])
        torch.set_num_threads(2)
        other = run_bench(model, cfg, tmp_path / "b", meter)
        assert not any(r["resumed"] for r in other["rows"]) and other["threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_bench_builds_mixtures_with_their_baselines(tiny_model_dir, tmp_path):
    from dataclasses import replace

    small = (("k", 2), ("sim_timesteps", 6), ("sim_images", 8), ("importance_batches", 1), ("elastic_steps", 1),
             ("agent_steps", 1), ("final_steps", 1), ("batch_size", 4))
    cfg = replace(CFG, search_budgets=(), ddim_steps=(), dpm_steps=(), deepcache_branches=(), deepcache_nonuniform=(),
                  expert_budgets=(0.8,), expert_settings=small, mixture_deepcache=2)
    model = load_model(tiny_model_dir)
    meter = QualityMeter.for_model((1, 16, 16), n_boot=10)
    result = run_bench(model, cfg, tmp_path / "b", meter)
    fam = [r["family"] for r in result["rows"]]
    assert fam == ["teacher", "experts", "experts+schedule", "experts-uniform", "diff-pruning"]
    rows = {r["family"]: r for r in result["rows"]}
    assert rows["experts"]["macs_per_image"] <= 0.8 * rows["teacher"]["macs_per_image"] + 1e-6
    assert rows["experts+schedule"]["macs_per_image"] < rows["experts"]["macs_per_image"]
    assert [c["baseline"] for c in result["mixture_vs_baselines"]] == [rows["experts-uniform"]["method"],
                                                                      rows["diff-pruning"]["method"]]
    assert "Mixtures against their baselines" in (tmp_path / "b" / "bench.md").read_text()
    # a pre-built mixture folder joins the table the same way
    folder = tmp_path / "b" / "experts" / weights_fingerprint(model.unet) / "budget-0.8" / "mixture"
    again = run_bench(model, replace(cfg, expert_budgets=(), mixtures=(str(folder),)), tmp_path / "c", meter)
    assert [r["family"] for r in again["rows"]] == ["teacher", "experts", "experts+schedule"]
    assert again["rows"][1]["metrics"] == rows["experts"]["metrics"]


def test_bench_keeps_schedules_that_differ_only_in_timesteps(tiny_model_dir, tmp_path):
    from dataclasses import replace

    cfg = replace(CFG, search_budgets=(), ddim_steps=(), dpm_steps=(), deepcache_branches=(), deepcache_nonuniform=())
    a = Schedule("dpmsolver++", (FULL, FULL, FULL), timesteps=(999, 500, 100), name="a")
    b = Schedule("dpmsolver++", (FULL, FULL, FULL), timesteps=(999, 600, 300), name="b")
    result = run_bench(load_model(tiny_model_dir), cfg, tmp_path / "b", QualityMeter.for_model((1, 16, 16), n_boot=10),
                       (a, b))
    rows = {r["method"]: r for r in result["rows"]}
    assert {"a", "b"} <= set(rows)
    assert len(list((tmp_path / "b" / "cache").glob("*.safetensors"))) == 3  # teacher, a, b: none merged
    assert rows["a"]["metrics"]["teacher_distance"] != rows["b"]["metrics"]["teacher_distance"]


def test_bench_searches_of_another_model_in_the_same_folder_are_its_own(tiny_model_dir, tmp_path):
    """A bench rerun after the model changed starts its own searches (it neither refuses nor reuses the old teacher)."""
    from dataclasses import replace

    from conftest import tiny_unet
    from flexdiff.bench.run import run_searches
    from flexdiff.cost import measure_step_costs
    from flexdiff.models import save_model

    cfg = replace(CFG, search_generations=0, autodiffusion=False)
    meter = QualityMeter.for_model((1, 16, 16), n_boot=5)
    a = load_model(tiny_model_dir)
    b = load_model(save_model(tiny_unet(seed=5), a.scheduler_config, tmp_path / "other"))
    for m in (a, b):
        run_searches(m, cfg, tmp_path / "bench", meter, measure_step_costs(m.unet))
    folders = sorted(p.name for p in (tmp_path / "bench" / "searches").iterdir())
    assert folders == sorted([weights_fingerprint(a.unet), weights_fingerprint(b.unet)])
    for fp in folders:
        assert list((tmp_path / "bench" / "searches" / fp).glob("teacher-*.safetensors"))
    # another seed in the same folder: its own searches (on its own noise), not a refused resume
    run_searches(a, replace(cfg, seed=1), tmp_path / "bench", meter, measure_step_costs(a.unet))
    assert list((tmp_path / "bench" / "searches" / f"{weights_fingerprint(a.unet)}-seed1").glob("teacher-*-10001.*"))


def test_unipc_rows_join_the_catalogue_when_asked():
    from flexdiff.bench.methods import BenchConfig

    names = [m.name for m in BenchConfig(unipc_steps=(5, 10)).methods()]
    assert "UniPC-5" in names and "UniPC-10" in names
    assert not any(m.name.startswith("UniPC") for m in BenchConfig().methods())


def test_search_preset_puts_a_plain_solver_and_deepcache_within_each_budget():
    from flexdiff.bench import config_from_options
    from flexdiff.cost import StepCosts

    cfg = config_from_options("search")
    costs = StepCosts(full=100.0, partial=(10.0, 30.0, 50.0))
    teacher = costs.schedule_macs(Schedule.full("ddim", cfg.teacher_steps))
    methods = cfg.methods()
    dpm_cache = [m for m in methods if m.family == "deepcache" and m.schedule.sampler == "dpmsolver++"]
    assert len(dpm_cache) == 6 and all(NULL not in m.schedule.steps for m in dpm_cache)
    for budget in cfg.search_budgets:  # each searched budget has "use fewer steps" peers at or under it
        fits = {m.family for m in methods if costs.schedule_macs(m.schedule) <= budget * teacher}
        assert {"ddim", "dpmsolver++", "unipc"} <= fits


def test_a_schedule_searched_over_a_mixture_joins_as_a_composed_row(tiny_model_dir, tmp_path):
    from dataclasses import replace

    small = (("k", 2), ("sim_timesteps", 6), ("sim_images", 8), ("importance_batches", 1), ("elastic_steps", 1),
             ("agent_steps", 1), ("final_steps", 1), ("batch_size", 4))
    cfg = replace(CFG, search_budgets=(), ddim_steps=(), dpm_steps=(), deepcache_intervals=(), deepcache_branches=(),
                  deepcache_nonuniform=(), expert_budgets=(0.8,), expert_settings=small, mixture_deepcache=0,
                  composed_speedups=(3.0,), teacher_steps=12)
    model = load_model(tiny_model_dir)
    result = run_bench(model, cfg, tmp_path / "b", QualityMeter.for_model((1, 16, 16), n_boot=10))
    rows = {r["family"]: r for r in result["rows"]}
    composed = rows["experts+search"]
    assert composed["model"] == rows["experts"]["model"]  # the schedule runs on the mixture
    assert composed["speedup_macs"] >= 3 - 1e-6 and composed["search_seconds"] > 0  # against the original teacher
    assert "+ Flexiffusion [rfid] ≤1/3" in composed["method"]
    # scored against the original teacher's run, not the mixture's own
    state = next((tmp_path / "b" / "searches").glob("*/composed-rfid-3x-vs-teacher/search_state.json"))
    assert json.loads(state.read_text())["identity"]["reference"] == weights_fingerprint(model.unet)


def test_bench_seed_from_the_command_line_reaches_the_bench(tiny_model_dir, tmp_path, monkeypatch):
    import flexdiff.bench
    from test_cli import run

    seen = {}
    monkeypatch.setattr(flexdiff.bench, "run_bench", lambda model, cfg, *a, **k: seen.setdefault("cfg", cfg) and {})
    monkeypatch.setattr(flexdiff.bench, "markdown_table", lambda result: "")
    code, out = run("bench", "--model", tiny_model_dir, "--out", tmp_path / "b", "--seed", 3, "--samples", 4)
    assert code == 0, out
    # it was silently 0: a "second seed" bench repeated the first, searches included (their noise is seed + 10,000)
    assert seen["cfg"].seed == 3 and seen["cfg"].samples == 4


def test_a_search_that_found_a_peers_schedule_keeps_its_row(tiny_model_dir, tmp_path, monkeypatch):
    """A searched schedule equal to a peer's (a plain solver, say) is still the search's result: its row stays,
    sampled once, says which row it equals, and is paired with the peers like any searched schedule."""
    import flexdiff.bench.run as bench_run

    name = "Flexiffusion [distance] ≤1/2 (ddim-3)"
    found = Schedule.full("ddim", 3, name=name)
    monkeypatch.setattr(bench_run, "run_searches", lambda *a, **k: ((("flexiffusion", found),), {name: 1.5}))
    cfg = BenchConfig(samples=12, batch_size=8, teacher_steps=6, ddim_steps=(3,), dpm_steps=(), deepcache_intervals=(),
                      deepcache_nonuniform=(), search_budgets=(0.5,))
    meter = QualityMeter.for_model((1, 16, 16), n_boot=20)
    result = run_bench(load_model(tiny_model_dir), cfg, tmp_path / "b", meter)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows[name]["same_as"] == "DDIM-3" and rows[name]["search_seconds"] == 1.5
    assert rows[name]["metrics"] == rows["DDIM-3"]["metrics"] and rows[name]["seconds"] == rows["DDIM-3"]["seconds"]
    assert any(c["schedule"] == name for c in result["search_vs_peers"])
    assert f"- {name} = DDIM-3" in (tmp_path / "b" / "bench.md").read_text()


def test_row_options_take_none_and_reach_the_bench(tiny_model_dir, tmp_path, monkeypatch):
    """--ddim-steps, --dpm-steps, --unipc-steps, --deepcache and --delta-dit take 'none' (no such rows: a bench of
    the mixture rows alone); a bad value names the option and 'none', and writes nothing."""
    import flexdiff.bench
    from test_cli import assert_user_error, run

    seen = {}
    monkeypatch.setattr(flexdiff.bench, "run_bench", lambda model, cfg, *a, **k: seen.setdefault("cfg", cfg) and {})
    monkeypatch.setattr(flexdiff.bench, "markdown_table", lambda result: "")
    code, out = run("bench", "--model", tiny_model_dir, "--out", tmp_path / "b", "--ddim-steps", "none",
                    "--dpm-steps", "4", "--unipc-steps", "none", "--deepcache", "none", "--delta-dit", "3,5")
    assert code == 0, out
    cfg = seen["cfg"]
    assert (cfg.ddim_steps, cfg.dpm_steps, cfg.unipc_steps, cfg.deepcache_intervals, cfg.delta_dit_intervals) == \
        ((), (4,), (), (), (3, 5))
    assert not [m for m in cfg.methods() if m.family in ("ddim", "deepcache")]
    for option, value in (("--deepcache", "0"), ("--delta-dit", "x"), ("--ddim-steps", "")):
        code, out = run("bench", "--model", tiny_model_dir, "--out", tmp_path / "c", option, value)
        assert_user_error(code, out, option, "'none'")
    assert not (tmp_path / "c").exists()
