"""`flexdiff search` end to end: tiny model for the mechanics, the shipped default for one real search."""

import json

import pytest
from typer.testing import CliRunner

from flexdiff.cli import app
from flexdiff.schedule import Schedule
from test_cli import assert_user_error, run

SMALL = ["--population", "3", "--generations", "1", "--eval-samples", "8", "--steps", "4,6", "--lengths", "1,2,3",
         "--ends", "0,300"]


def test_search_then_sample_with_found_schedule(tiny_model_dir, tmp_path):
    code, out = run("search", "--model", tiny_model_dir, "--speedup", 2, "--out", tmp_path / "s", *SMALL)
    assert code == 0, out
    best = Schedule.load(tmp_path / "s" / "best.json")
    assert best.meta["speedup_macs"] >= 2 - 1e-9 and best.sampler == "dpmsolver++"
    code, out = run("sample", "--model", tiny_model_dir, "--schedule", tmp_path / "s" / "best.json",
                    "--n", 4, "--out", tmp_path / "g.png")
    assert code == 0, out
    # the same command again finds the finished state and returns the same best schedule
    code, out = run("search", "--model", tiny_model_dir, "--speedup", 2, "--out", tmp_path / "s", *SMALL)
    assert code == 0 and Schedule.load(tmp_path / "s" / "best.json") == best


def test_pareto_and_stepwise_modes(tiny_model_dir, tmp_path):
    code, out = run("search", "--model", tiny_model_dir, "--pareto", "--out", tmp_path / "p", *SMALL)
    assert code == 0, out
    front = json.loads((tmp_path / "p" / "front.json").read_text())
    assert front and all(Schedule.from_dict(f).steps for f in front)
    code, out = run("search", "--model", tiny_model_dir, "--space", "stepwise", "--budget", 0.5, "--metric", "fid",
                    "--out", tmp_path / "w", "--population", 3, "--generations", 1, "--eval-samples", 8,
                    "--steps", "3,4")
    assert code == 0, out
    assert Schedule.load(tmp_path / "w" / "best.json").timesteps is not None


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--budget", "2"], "--budget 2.0"),
        (["--budget", "0.5", "--speedup", "2"], "either --budget or --speedup"),
        ([], "give --budget or --speedup"),
        (["--speedup", "4", "--space", "tree"], "--space 'tree'"),
        (["--speedup", "4", "--space", "stepwise", "--sampler", "ddim"], "picks its own timesteps"),
        (["--speedup", "4", "--branches", "0,9"], "this model has branches 0..5"),
        (["--speedup", "4", "--metric", "psnr"], "--metric 'psnr'"),
        (["--speedup", "1000", "--steps", "20", "--lengths", "1,2"], "no schedule in the search space fits"),
    ],
)
def test_bad_search_settings(tiny_model_dir, tmp_path, args, fragment):
    code, out = run("search", "--model", tiny_model_dir, "--out", tmp_path / "x", "--population", 2,
                    "--generations", 0, "--eval-samples", 8, *args)
    assert_user_error(code, out, fragment)


def test_small_real_search_on_default_model(tmp_path):
    """A real (small) search on the shipped model: the result keeps the budget and beats plain DDIM at that cost."""
    result = CliRunner().invoke(app, ["search", "--speedup", "16", "--out", str(tmp_path / "s"), "--population", "6",
                                      "--generations", "2", "--eval-samples", "64", "--seed", "1"])
    assert result.exit_code == 0, result.output
    best = Schedule.load(tmp_path / "s" / "best.json")
    assert best.meta["speedup_macs"] >= 16 - 1e-9
    history = json.loads((tmp_path / "s" / "history.json").read_text())
    assert history[-1]["best_fitness"] <= history[0]["best_fitness"]
    assert (tmp_path / "s" / "search.png").stat().st_size > 0

    from flexdiff.metrics import QualityMeter
    from flexdiff.models import load_model
    from flexdiff.search.fitness import Fitness

    fitness = Fitness(load_model(), QualityMeter.for_model((1, 16, 16), n_boot=10), Schedule.full("ddim", 100),
                      "rfid", 64, 1 + 10_000, tmp_path / "s")  # the default fitness, same evaluation noise
    ddim6, _ = fitness(Schedule.full("ddim", 6))  # plain DDIM at about the same cost (1/16.7)
    assert best.meta["fitness"] < ddim6


def test_search_folder_of_another_model_is_refused(tiny_model_dir, tmp_path):
    from conftest import tiny_unet
    from flexdiff.models import save_model

    other = save_model(tiny_unet(seed=5), {"num_train_timesteps": 1000}, tmp_path / "other")
    code, out = run("search", "--model", tiny_model_dir, "--speedup", 2, "--out", tmp_path / "s", *SMALL)
    assert code == 0, out
    code, out = run("search", "--model", other, "--speedup", 2, "--out", tmp_path / "s", *SMALL)
    assert_user_error(code, out, "a search on another model is stored here")


def test_a_search_scored_against_a_reference_model(tiny_model_dir, tmp_path):
    """A cheaper model searched against its original teacher: the fitness compares with the reference's DDIM run."""
    from conftest import tiny_unet
    from flexdiff.fingerprints import weights_fingerprint
    from flexdiff.metrics import meter_for
    from flexdiff.models import load_model, save_model
    from flexdiff.search.fitness import Fitness

    other_dir = save_model(tiny_unet(seed=5), {"num_train_timesteps": 1000}, tmp_path / "other")
    args = ["search", "--model", other_dir, "--speedup", 2, "--out", tmp_path / "s", *SMALL]
    code, out = run(*args, "--reference", tiny_model_dir)
    assert code == 0, out
    teacher, other = load_model(tiny_model_dir), load_model(other_dir)
    state = json.loads((tmp_path / "s" / "search_state.json").read_text())
    assert state["identity"]["reference"] == weights_fingerprint(teacher.unet)
    best = Schedule.load(tmp_path / "s" / "best.json")
    meter, ddim100, metric = meter_for(other, None, None), Schedule.full("ddim", 100), best.meta["metric"]
    reference = Fitness(teacher, meter, ddim100, metric, 8, 10_000, tmp_path / "r").teacher
    against_reference = Fitness(other, meter, ddim100, metric, 8, 10_000, tmp_path / "r", teacher_features=reference)
    against_itself = Fitness(other, meter, ddim100, metric, 8, 10_000, tmp_path / "o")
    assert best.meta["fitness"] == pytest.approx(against_reference(best)[0], rel=1e-5)
    assert abs(against_itself(best)[0] - best.meta["fitness"]) > 1e-3  # not the model's own teacher
    # the same folder without the reference is another search: refused, not mixed
    code, out = run(*args)
    assert_user_error(code, out, "other settings")
    code, out = run(*args, "--reference", tmp_path / "nope")
    assert_user_error(code, out, "--reference", "no such file or folder")
