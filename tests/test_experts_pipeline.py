"""The `flexdiff experts` pipeline end to end on the shipped default model (tiny settings), and its CLI."""

import json
import shutil

import pytest
import torch

from flexdiff.errors import FlexdiffError
from flexdiff.experts.baselines import pruned_baseline, uniform_experts
from flexdiff.experts.pipeline import ExpertsConfig, ExpertsPipeline
from flexdiff.mixture import Mixture
from flexdiff.models import default_mixture_dir, load_model
from flexdiff.sampling import initial_noise, sample
from flexdiff.schedule import Schedule
from test_cli import assert_user_error, run  # noqa: E402

SMALL = dict(k=2, sim_timesteps=6, sim_images=16, importance_batches=1, elastic_steps=2, agent_steps=2,
             final_steps=2, batch_size=8, budget=0.6, num_steps=20)


def test_small_pipeline_on_the_default_model_stage_by_stage(tmp_path):
    model = load_model()
    pipe = ExpertsPipeline(model, tmp_path / "exp", ExpertsConfig(**SMALL))
    assert pipe.run(("intervals",)) is None
    iv = json.loads((tmp_path / "exp" / "intervals" / "intervals.json").read_text())
    assert len(iv["starts"]) == 2 and (tmp_path / "exp" / "intervals" / "similarity.png").exists()
    assert pipe.run(("intervals", "elastic")) is None
    assert len(list((tmp_path / "exp" / "elastic").glob("expert_*/elastic.safetensors"))) == 2
    out = pipe.run()
    man = json.loads((out / "mixture.json").read_text())
    assert man["fraction_of_teacher"] <= 0.6 + 1e-9
    assert sum(man["steps_served"]) == 20
    mix = load_model(out)
    assert isinstance(mix.unet, Mixture) and len(mix.unet.experts) == 2
    imgs = sample(mix.unet, mix.scheduler_config, Schedule.full("ddim", 20), initial_noise(2, (1, 16, 16), 0)).images
    assert imgs.shape == (2, 1, 16, 16) and torch.isfinite(imgs).all()
    # a second run finds every stage done and returns the same folder
    assert ExpertsPipeline(model, tmp_path / "exp", ExpertsConfig(**SMALL)).run() == out
    # the baselines: same-width experts and one pruned model, each at about the mixture's MACs
    uni = load_model(uniform_experts(pipe))
    specs = {json.dumps(e["spec"]) for e in uni.unet.manifest["experts"]}
    assert len(specs) == 1
    pruned = pruned_baseline(pipe)
    info = json.loads((pruned / "pruning.json").read_text())
    assert info["steps"] == 2 * (2 + 2)  # the experts' total fine-tuning steps
    assert not isinstance(load_model(pruned).unet, Mixture)
    # a finished mixture or baseline is not handed back for other fine-tuning settings
    longer = ExpertsPipeline(model, tmp_path / "exp", ExpertsConfig(**{**SMALL, "final_steps": 3}))
    for build in (longer.final, lambda: uniform_experts(longer), lambda: pruned_baseline(longer)):
        with pytest.raises(FlexdiffError, match="other settings"):
            build()
    assert pruned_baseline(pipe) == pruned  # the same settings still resume
    shutil.rmtree(out)  # the mixture made again with the longer tuning: the old pruned model is still refused
    shutil.rmtree(tmp_path / "exp" / "budget-0.6" / "final")
    assert longer.final() == out
    with pytest.raises(FlexdiffError, match="pruned-training.*other settings"):
        pruned_baseline(longer)


def test_stage_folders_refuse_other_settings(tmp_path):
    model = load_model()
    ExpertsPipeline(model, tmp_path / "exp", ExpertsConfig(**SMALL)).run(("intervals",))
    record = (tmp_path / "exp" / "experts_config.json").read_text()
    other = ExpertsPipeline(model, tmp_path / "exp", ExpertsConfig(**{**SMALL, "k": 3}))
    with pytest.raises(FlexdiffError, match="other settings"):
        other.run(("intervals",))
    assert (tmp_path / "exp" / "experts_config.json").read_text() == record  # a refused run rewrites nothing


def test_shipped_mixture_loads_and_is_cheaper_than_the_teacher():
    mix = load_model(default_mixture_dir())
    man = mix.unet.manifest
    assert man["fraction_of_teacher"] <= man["budget"] + 1e-9
    assert [e["interval"] for e in man["experts"]] == [list(b) for b in mix.unet.intervals.bounds()]


def test_cli_refuses_an_impossible_budget_before_training(tmp_path):
    code, out = run("experts", "--out", tmp_path / "e", "--budget", "0.2")
    assert_user_error(code, out, "--budget 0.2", "cannot be met")
    assert not (tmp_path / "e" / "elastic").exists()


def test_cli_bad_stage_and_measure(tmp_path):
    code, out = run("experts", "--out", tmp_path / "e", "--stage", "prune")
    assert_user_error(code, out, "--stage 'prune'", "intervals, elastic, agent, final")
    code, out = run("intervals", "--out", tmp_path / "i", "--measure", "l2")
    assert_user_error(code, out, "--measure 'l2'", "grad, cka, mean")
    code, out = run("experts", "--out", tmp_path / "e", "--budget", "1.5")
    assert_user_error(code, out, "--budget 1.5")


def test_cli_intervals_on_the_default(tmp_path):
    code, out = run("intervals", "--out", tmp_path / "i", "--timesteps", "6", "--images", "8", "--k", "2")
    assert code == 0, out
    assert "2 intervals" in out and (tmp_path / "i" / "intervals.json").exists()


def test_stage_folder_of_another_model_is_refused(tmp_path, tiny_model_dir):
    from conftest import tiny_unet
    from flexdiff.models import save_model

    small = {**SMALL, "sim_images": 8}
    ExpertsPipeline(load_model(tiny_model_dir), tmp_path / "exp", ExpertsConfig(**small)).run(("intervals",))
    other = load_model(save_model(tiny_unet(seed=3), {"num_train_timesteps": 1000}, tmp_path / "other"))
    with pytest.raises(FlexdiffError, match="built from another model"):
        ExpertsPipeline(other, tmp_path / "exp", ExpertsConfig(**small)).run(("intervals",))


def test_a_latency_budget_is_met_in_measured_latency_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    import flexdiff.experts.pipeline as pipeline_module
    from flexdiff.experts.elastic import ElasticUNet

    # the timer replaced by a deterministic stand-in (a tiny model's real timings are noise): "latency" grows
    # with the parameter count, and each measurement is counted
    measured = []

    def fake_latency(unet, batch):
        measured.append(batch)
        return 1e-9 * sum(p.numel() for p in unet.parameters())

    monkeypatch.setattr(pipeline_module, "measure_latency", fake_latency)
    cfg = ExpertsConfig(**{**SMALL, "budget_kind": "latency", "latency_batch": 4, "budget": 0.95})
    model = load_model(tiny_model_dir)
    pipe = ExpertsPipeline(model, tmp_path / "exp", cfg)
    choice = pipe.agent()
    tables = list((tmp_path / "exp" / "latency").glob("*.json"))
    assert len(tables) == 1  # measured once on this machine, kept
    table = json.loads(tables[0].read_text())
    full = pipe.spec_latency(ElasticUNet(model.unet), ElasticUNet(model.unet).full)
    served = pipe.served(pipe.intervals())
    run = sum(table[json.dumps(e["spec"], sort_keys=True)] * n for e, n in zip(choice["experts"], served))
    assert run <= cfg.budget * full * sum(served) * (1 + 1e-9)  # the budget holds in the latency it counted
    assert choice["fraction_of_teacher"] <= cfg.budget + 1e-9
    settings = json.loads((tmp_path / "exp" / "budget-0.95-latency" / "agent" / "settings.json").read_text())
    assert settings["budget_kind"] == "latency"
    assert set(measured) == {4}
    before = len(measured)
    again = ExpertsPipeline(model, tmp_path / "exp", cfg)
    assert again.agent() == choice
    again.spec_space(ElasticUNet(model.unet))  # every spec's latency again: read from the table, not re-measured
    assert len(measured) == before
    # a MACs budget of the same size is another agent, in its own folder beside the latency one
    by_macs = ExpertsPipeline(model, tmp_path / "exp", ExpertsConfig(**{**SMALL, "budget": 0.95}))
    assert by_macs.budget_dir() == tmp_path / "exp" / "budget-0.95"
    by_macs.agent()
    assert json.loads((by_macs.budget_dir() / "agent" / "settings.json").read_text()).get("budget_kind") is None
    assert again.agent() == choice  # still the latency agent's choice


def test_an_unknown_budget_kind_is_refused():
    with pytest.raises(FlexdiffError, match="--budget-kind 'watts'"):
        ExpertsConfig(budget_kind="watts")
