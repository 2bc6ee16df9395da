"""Every verb on a table of bad inputs: exit 2, one line on stderr, no traceback, and nothing written.

Each row is (verb and arguments, a fragment the message must contain). Arguments name files of a
small world built once per test: `{model}` a tiny UNet folder, `{file}` a plain file, `{out}` a
folder that does not exist yet, and broken models, schedules and mixtures.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tiny_pipelines
from flexdiff.cli import app

FOLDER_VERBS = {  # the verbs that fill an --out folder, with the fewest arguments that would run them
    "train": ["--steps", "1"],
    "search": ["--model", "{model}", "--speedup", "2"],
    "bench": ["--model", "{model}"],
    "intervals": ["--model", "{model}"],
    "experts": ["--model", "{model}", "--data", "{images}"],
    "proxy-study": ["--model", "{model}"],
    "metric-study": ["--model", "{model}"],
    "train-classifier": [],
}

CASES = []
for verb, args in FOLDER_VERBS.items():
    CASES += [
        ([verb, *args, "--out", "{file}"], "is a file; give a folder"),
        ([verb, *args, "--out", "{file}/sub"], "is a file, not a folder"),
        ([verb, *args, "--out", "/proc/flexdiff-test/out"], "cannot create files in /proc"),
    ]
SAMPLE = ["sample", "--model", "{model}", "--steps", "2", "--n", "2"]
EVALUATE = ["evaluate", "--model", "{model}", "--steps", "2", "--samples", "4", "--teacher-steps", "3"]
CASES += [
    # file targets: checked before sampling
    ([*SAMPLE, "--out", "{dir}"], "is a folder; give a file name"),
    ([*SAMPLE, "--out", "{file}/g.png"], "is a file, not a folder"),
    ([*SAMPLE, "--out", "/proc/flexdiff-test/g.png"], "cannot create files in /proc"),
    ([*SAMPLE, "--out", "{out}/grid.jpg"], "ending in .png"),
    ([*SAMPLE, "--out", "{out}/g.png", "--save-tensors", "{dir}"], "--save-tensors"),
    ([*EVALUATE, "--out", "{dir}"], "is a folder; give a file name"),
    ([*EVALUATE, "--out", "{file}/m.json"], "is a file, not a folder"),
    # models
    (["sample", "--model", "{config_list}", "--out", "{out}/g.png"], "must be a JSON object"),
    (["sample", "--model", "{bad_scheduler}", "--out", "{out}/g.png"], "beta_schedule is 'wobbly'"),
    (["sample", "--model", "{bad_timesteps_cfg}", "--out", "{out}/g.png"], "num_train_timesteps is 'many'"),
    (["sample", "--model", "{pipeline_without_unet}", "--out", "{out}/g.png"], "without a unet/ or transformer/ subfolder"),
    (["sample", "--model", "{file}", "--out", "{out}/g.png"], "got a file"),
    # schedules: named by file, checked against the model before any sampling
    (["sample", "--model", "{model}", "--schedule", "{latin1_schedule}", "--out", "{out}/g.png"], "not UTF-8"),
    (["sample", "--model", "{model}", "--schedule", "{typo_schedule}", "--out", "{out}/g.png"], "stepz"),
    (["sample", "--model", "{model}", "--schedule", "{late_schedule}", "--out", "{out}/g.png"],
     "timestep 1200 is beyond the model's training range 0..999"),
    (["evaluate", "--model", "{model}", "--schedule", "{late_schedule}", "--samples", "4"], "--schedule"),
    (["bench", "--model", "{model}", "--schedule", "{branch_schedule}", "--out", "{out}"], "uses branch 99"),
    # mixtures
    (["sample", "--model", "{mixture_swapped}", "--out", "{out}/g.png"], "swapped"),
    (["sample", "--model", "{mixture_other_T}", "--out", "{out}/g.png"], "num_train_timesteps 500"),
    (["sample", "--model", "{mixture_escape}", "--out", "{out}/g.png"], "must name a subfolder"),
    (["bench", "--model", "{model}", "--mixture", "{mixture_swapped}", "--out", "{out}"], "swapped"),
    # settings refused before anything is written
    (["train", "--data", "{images}", "--resolution", "10", "--out", "{out}"], "multiple of 4"),
    (["train", "--lr-schedule", "step", "--out", "{out}"], "--lr-schedule 'step'"),
    (["train", "--lr", "inf", "--out", "{out}"], "--lr inf: must be a finite number"),
    (["train", "--lr", "nan", "--out", "{out}"], "--lr nan"),
    (["sample", "--model", "{model}", "--threads", "-1", "--out", "{out}/g.png"], "--threads -1"),
    (["evaluate", "--model", "{model}", "--real-data", "{dir}", "--samples", "4"], "--real-data"),
    (["evaluate", "--model", "{model}", "--real-data", "{images}", "--samples", "4"], "4 images; a Fréchet distance"),
    (["search", "--model", "{model}", "--out", "{out}", "--speedup", "1000", "--steps", "20", "--lengths", "1,2"],
     "no schedule in the search space fits"),
    (["search", "--model", "{model}", "--out", "{out}", "--speedup", "2", "--metric", "psnr"], "--metric 'psnr'"),
    (["search", "--model", "{model}", "--out", "{out}", "--speedup", "2", "--reference", "{file}"],
     "error: --reference"),
    (["bench", "--model", "{model}", "--expert-budget-kind", "watts", "--out", "{out}"], "--budget-kind 'watts'"),
    (["experts", "--model", "{model}", "--data", "{images}", "--k", "50", "--out", "{out}"], "--k 50"),
    (["experts", "--model", "{model}", "--data", "{images}", "--agent-score", "fid", "--out", "{out}"],
     "--agent-score 'fid'; accepted: teacher, denoise"),
    (["experts", "--model", "{model}", "--data", "{images}", "--agent-spend", "1.2", "--out", "{out}"],
     "--agent-spend 1.2"),
    (["intervals", "--model", "{model}", "--data", "{images}", "--k", "50", "--out", "{out}"], "--k 50"),
    (["intervals", "--model", "{model}", "--measure", "l2", "--out", "{out}"], "--measure 'l2'"),
    # where the model runs: a device this machine lacks, an unknown dtype (before anything is read or written)
    *[([verb, *args, "--device", "cuda", "--out", "{out}" + suffix], "--device cuda")
      for verb, args, suffix in (("sample", ["--model", "{model}"], "/g.png"), ("search", ["--model", "{model}", "--speedup", "2"], ""),
                                 ("bench", ["--model", "{model}"], ""), ("metric-study", ["--model", "{model}"], ""))],
    ([*EVALUATE, "--device", "cuda:3"], "--device cuda:3"),
    ([*SAMPLE, "--device", "tpu", "--out", "{out}/g.png"], "--device 'tpu': accepted values are auto, cpu, cuda"),
    (["train", "--dtype", "float16", "--steps", "1", "--out", "{out}"], "--dtype float16: training in float16"),
    (["train", "--device", "cuda", "--steps", "1", "--out", "{out}"], "--device cuda"),
    ([*SAMPLE, "--dtype", "float64", "--out", "{out}/g.png"], "--dtype 'float64': accepted values are auto, float32"),
    (["search", "--model", "{model}", "--speedup", "2", "--dtype", "half", "--out", "{out}"], "--dtype 'half'"),
    # issue 28: options that would be ignored, JSON fields of the wrong type, sizes diffusers or torch refuse
    ([*SAMPLE[:3], "--schedule", "{ok_schedule}", "--steps", "10", "--out", "{out}/g.png"], "leave out --steps 10"),
    ([*SAMPLE[:3], "--schedule", "{ok_schedule}", "--deepcache", "3", "--out", "{out}/g.png"], "leave out --deepcache 3"),
    ([*SAMPLE[:3], "--branch", "2", "--out", "{out}/g.png"], "--branch 2 is the cache branch of --deepcache"),
    ([*SAMPLE[:3], "--deepcache", "3", "--branch", "99", "--out", "{out}/g.png"], "--deepcache 3 --branch 99"),
    ([*SAMPLE[:3], "--steps", "100000", "--out", "{out}/g.png"], "--steps 100000: 100000 steps, but the model was trained on 1000"),
    ([*SAMPLE[:3], "--schedule", "{long_schedule}", "--out", "{out}/g.png"], "at most 1000 steps"),
    ([*SAMPLE[:3], "--schedule", "{format99_schedule}", "--out", "{out}/g.png"], "format is 99"),
    ([*SAMPLE[:3], "--schedule", "{float_t_schedule}", "--out", "{out}/g.png"], "timesteps is [500.5, 100.2]"),
    ([*SAMPLE[:3], "--schedule", "{bool_t_schedule}", "--out", "{out}/g.png"], "timesteps is [True, False]"),
    (["sample", "--model", "{mixture_unknown_field}", "--out", "{out}/g.png"], "unknown field 'budgett'"),
    (["sample", "--model", "{mixture_bad_starts}", "--out", "{out}/g.png"], "mixture.json: intervals: 'starts' must rise"),
    (["sample", "--model", "{sd_no_vae}", "--prompt", "a cat", "--out", "{out}/g.png"], "--model"),
    (["sample", "--model", "{class_config_no_weights}", "--out", "{out}/g.png"], "config.json and the weights disagree"),
    (["search", "--model", "{model}", "--speedup", "2", "--steps", "", "--out", "{out}"], "--steps ''"),
    (["sample", "--model", "{size0}", "--out", "{out}/g.png"], "sample_size is 0; expected a whole number above 0"),
    (["sample", "--model", "{short_T}", "--steps", "50", "--out", "{out}/g.png"], "trained on 10 timesteps: at most 10"),
    ([*SAMPLE[:3], "--n", "100000000000", "--out", "{out}/g.png"], "out of memory"),
    (["search", "--model", "{model}", "--speedup", "nan", "--out", "{out}"], "--speedup nan: must be a finite"),
    (["bench", "--model", "{model}", "--search-budgets", "", "--out", "{out}"], "--search-budgets ''"),
    (["bench", "--model", "{model}", "--deepcache-branches", "99", "--out", "{out}"], "--deepcache-branches 99: the model"),
    (["search", "--model", "{model}", "--speedup", "2", "--ray-address", "127.0.0.1:1", "--out", "{out}"],
     "--ray-address 127.0.0.1:1: nothing answers at 127.0.0.1:1"),
    (["search", "--model", "{model}", "--speedup", "2", "--ray-address", "somewhere", "--out", "{out}"],
     "expected auto, HOST:PORT"),
    # damaged state in an existing --out: refused, and nothing added
    (["train", "--out", "{foreign_checkpoint_run}", "--steps", "1"], "not a flexdiff training checkpoint"),
    (["train", "--out", "{pickled_checkpoint_run}", "--steps", "1"], "cannot read this checkpoint"),
    (["search", "--model", "{model}", "--speedup", "2", "--out", "{damaged_search}"], "damaged search state"),
]


def _tiny_mixture(root: Path, tiny_model_dir: Path) -> Path:
    from conftest import tiny_unet
    from flexdiff.mixture import Intervals, full_spec, save_mixture
    from flexdiff.models import load_model
    from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG

    a, b = load_model(tiny_model_dir).unet, tiny_unet(seed=1)
    return save_mixture([a, b], Intervals((0, 500), 1000), [full_spec(a), full_spec(b)],
                        dict(DEFAULT_SCHEDULER_CONFIG), root)


@pytest.fixture
def world(tmp_path, tiny_model_dir):
    from PIL import Image

    w = dict(model=tiny_model_dir, file=tmp_path / "a_file.txt", dir=tmp_path / "a_folder", out=tmp_path / "out")
    w["file"].write_text("not a folder")
    w["dir"].mkdir()
    w["images"] = tmp_path / "images"
    w["images"].mkdir()
    for i in range(4):
        Image.new("L", (16, 16), color=40 * i).save(w["images"] / f"{i}.png")

    def model_copy(name, edit=None, sched_edit=None):
        import shutil

        d = tmp_path / name
        shutil.copytree(tiny_model_dir, d)
        if edit:
            (d / "config.json").write_text(json.dumps(edit(json.loads((d / "config.json").read_text()))))
        if sched_edit:
            f = d / "scheduler_config.json"
            f.write_text(json.dumps(sched_edit(json.loads(f.read_text()))))
        return d

    w["config_list"] = model_copy("config_list", edit=lambda c: [c])
    w["bad_scheduler"] = model_copy("bad_sched", sched_edit=lambda c: {**c, "beta_schedule": "wobbly"})
    w["bad_timesteps_cfg"] = model_copy("bad_T", sched_edit=lambda c: {**c, "num_train_timesteps": "many"})
    pipe = tmp_path / "pipeline"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline",
                                                       "transformer": ["diffusers", "DiTTransformer2DModel"]}))
    w["pipeline_without_unet"] = pipe

    def schedule(name, data, raw=None):
        f = tmp_path / name
        f.write_bytes(raw) if raw is not None else f.write_text(json.dumps(data))
        return f

    w["latin1_schedule"] = schedule("latin1.json", None, raw='{"sampler": "ddim", "name": "é"}'.encode("latin-1"))
    w["typo_schedule"] = schedule("typo.json", {"sampler": "ddim", "stepz": ["full", "full"]})
    w["late_schedule"] = schedule("late.json", {"sampler": "dpmsolver++", "steps": ["full", "full"],
                                                "timesteps": [1200, 600]})
    w["branch_schedule"] = schedule("branch.json", {"sampler": "ddim", "steps": ["full", "partial:99"]})
    w["format99_schedule"] = schedule("format99.json", {"format": 99, "sampler": "ddim", "steps": ["full"]})
    w["float_t_schedule"] = schedule("float_t.json", {"sampler": "dpmsolver++", "steps": ["full", "full"],
                                                      "timesteps": [500.5, 100.2]})
    w["bool_t_schedule"] = schedule("bool_t.json", {"sampler": "dpmsolver++", "steps": ["full", "full"],
                                                    "timesteps": [True, False]})
    w["long_schedule"] = schedule("long.json", {"sampler": "ddim", "steps": ["full"] * 5000})
    w["ok_schedule"] = schedule("ok.json", {"sampler": "ddim", "steps": ["full", "full"]})
    w["size0"] = model_copy("size0", edit=lambda c: {**c, "sample_size": 0})
    w["short_T"] = model_copy("short_T", sched_edit=lambda c: {**c, "num_train_timesteps": 10})
    w["class_config_no_weights"] = model_copy("class_mismatch", edit=lambda c: {**c, "num_class_embeds": 5})

    mix = _tiny_mixture(tmp_path / "mixture_swapped", tiny_model_dir)
    os.rename(mix / "expert_0", mix / "tmp")
    os.rename(mix / "expert_1", mix / "expert_0")
    os.rename(mix / "tmp", mix / "expert_1")
    w["mixture_swapped"] = mix
    mix = _tiny_mixture(tmp_path / "mixture_other_T", tiny_model_dir)
    f = mix / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "num_train_timesteps": 500}))
    w["mixture_other_T"] = mix
    mix = _tiny_mixture(tmp_path / "mixture_escape", tiny_model_dir)
    man = json.loads((mix / "mixture.json").read_text())
    man["experts"][1]["folder"] = "../mixture_other_T/expert_1"
    (mix / "mixture.json").write_text(json.dumps(man))
    w["mixture_escape"] = mix
    mix = _tiny_mixture(tmp_path / "mixture_unknown_field", tiny_model_dir)
    man = json.loads((mix / "mixture.json").read_text())
    (mix / "mixture.json").write_text(json.dumps({**man, "budgett": 0.5}))
    w["mixture_unknown_field"] = mix
    mix = _tiny_mixture(tmp_path / "mixture_bad_starts", tiny_model_dir)
    man = json.loads((mix / "mixture.json").read_text())
    man["intervals"]["starts"] = [0, 1500]
    (mix / "mixture.json").write_text(json.dumps(man))
    w["mixture_bad_starts"] = mix
    sd = tiny_pipelines.stable_diffusion(tmp_path / "sd_no_vae")
    for f in (sd / "vae").iterdir():  # model_index.json still names the decoder
        f.unlink()
    w["sd_no_vae"] = sd

    run = tmp_path / "foreign_run"
    run.mkdir()
    torch.save({"weights": torch.zeros(2)}, run / "checkpoint.pt")
    w["foreign_checkpoint_run"] = run
    run = tmp_path / "pickled_run"
    run.mkdir()
    torch.save({"model": Path("somewhere")}, run / "checkpoint.pt")  # a pickled object: weights_only refuses it
    w["pickled_checkpoint_run"] = run
    run = tmp_path / "damaged_search"
    run.mkdir()
    (run / "search_state.json").write_text(json.dumps({"identity": {}, "generation": "three"}))
    w["damaged_search"] = run
    return w


def _tree(root: Path) -> dict[str, float]:
    """Every path with its file's modification time (folders: present or not; a lock file come and gone
    touches a folder's own time)."""
    return {str(p): (0 if p.is_dir() else p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("args, fragment", CASES, ids=[" ".join(a[:1] + a[-2:]) + f" [{i}]" for i, (a, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, args, fragment):
    argv = [a.format(**world) for a in args]
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, (argv, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], (fragment, lines[0])
    assert _tree(tmp_path) == before, "a refused command changed files"


def test_a_second_run_into_a_busy_folder_is_refused(tiny_model_dir, tmp_path):
    from flexdiff.outputs import LOCK_FILE, run_folder

    out = tmp_path / "s"
    with run_folder(out):  # another run holds the folder
        result = CliRunner().invoke(app, ["search", "--model", str(tiny_model_dir), "--speedup", "2",
                                          "--out", str(out), "--population", "2", "--generations", "0"])
        assert result.exit_code == 2, result.output
        assert "another flexdiff run is using this folder" in result.stderr
        assert (out / LOCK_FILE).exists()
    assert not (out / LOCK_FILE).exists()  # released and removed: the folder holds only results


def test_a_failed_run_removes_the_folders_it_created_but_keeps_results(tmp_path):
    from flexdiff.errors import FlexdiffError
    from flexdiff.outputs import run_folder

    with pytest.raises(FlexdiffError):
        with run_folder(tmp_path / "a" / "b"):
            raise FlexdiffError("refused")
    assert not (tmp_path / "a").exists()
    with pytest.raises(FlexdiffError):
        with run_folder(tmp_path / "c"):
            (tmp_path / "c" / "checkpoint.pt").write_text("progress worth keeping")
            raise FlexdiffError("killed later")
    assert (tmp_path / "c" / "checkpoint.pt").exists()


def test_temporaries_of_a_killed_run_are_cleaned_on_the_next_start(tmp_path):
    from flexdiff.outputs import run_folder

    out = tmp_path / "run"
    (out / "cache").mkdir(parents=True)
    stale = [out / ".checkpoint.pt.ab12_x9z.tmp", out / "cache" / ".0123abcd.safetensors.Qw3rTy12.tmp"]
    for f in stale:
        f.write_bytes(b"half a file")
    (out / ".mixture.k3J9s0aa.tmp").mkdir()  # a mixture folder being built
    (out / ".mix.old").mkdir()  # swap cut after the new folder arrived: the old one goes
    (out / "mix").mkdir()
    (out / ".only.old").mkdir()  # swap cut before the new one arrived: the old one is put back
    (out / ".only.old" / "mixture.json").write_text("{}")
    keep = [out / "notes.tmp", out / ".hidden", out / "cache" / "0123abcd.safetensors"]
    for f in keep:
        f.write_text("mine")
    with run_folder(out):
        pass
    assert not any(f.exists() for f in stale)
    assert not (out / ".mixture.k3J9s0aa.tmp").exists() and not (out / ".mix.old").exists()
    assert (out / "only" / "mixture.json").exists() and not (out / ".only.old").exists()
    assert all(f.exists() for f in keep)


def test_a_truncated_cache_is_redrawn_not_trusted(tmp_path):
    from safetensors.torch import save_file

    from flexdiff.io import load_cache

    path = tmp_path / "teacher.safetensors"
    save_file({"features": torch.ones(4, 3)}, path)
    assert torch.equal(load_cache(path)["features"], torch.ones(4, 3))
    path.write_bytes(path.read_bytes()[:40])  # a kill in the middle of a copy by hand
    assert load_cache(path) is None and not path.exists()


def test_replacing_an_existing_output_file_is_said(tiny_model_dir, tmp_path):
    (tmp_path / "g.png").write_bytes(b"old")
    result = CliRunner().invoke(app, ["sample", "--model", str(tiny_model_dir), "--steps", "2", "--n", "2",
                                      "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    assert "exists and will be replaced" in result.stderr
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_a_mixture_saved_by_flexdiff_loads_and_its_experts_are_checked(tiny_model_dir, tmp_path):
    from flexdiff.models import load_model

    mix = _tiny_mixture(tmp_path / "mix", tiny_model_dir)
    man = json.loads((mix / "mixture.json").read_text())
    assert all(len(e["weights"]) == 16 for e in man["experts"])
    assert len(load_model(mix).unet.experts) == 2


@pytest.mark.parametrize("verb", ["sample", "evaluate", "train", "train-classifier", "search", "proxy-study", "bench",
                                  "intervals", "experts", "metric-study"])
def test_a_negative_seed_is_refused_by_its_option(verb, tmp_path):
    """numpy refuses negative seeds deep inside a run (a traceback after the set-up); the option refuses them first."""
    result = CliRunner().invoke(app, [verb, "--seed", "-1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--seed" in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--labels", ""], "--labels ''"),
    (["--labels", "3", "--guidance", "nan"], "--guidance nan: must be a finite number"),
    (["--seed", str(2 ** 70)], "--seed"),
])
def test_class_conditional_options_are_refused_before_sampling(tmp_path, args, fragment):
    from conftest import tiny_class_unet
    from flexdiff.models import save_model
    from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG

    model = save_model(tiny_class_unet(), dict(DEFAULT_SCHEDULER_CONFIG), tmp_path / "class_model")
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, ["sample", "--model", str(model), "--steps", "2", *args,
                                      "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output
    assert _tree(tmp_path) == before


def test_a_model_whose_config_drops_its_class_weights_is_refused(tmp_path):
    """config.json says num_class_embeds: null while the weights hold a class embedding: refused, naming the key
    (diffusers would load it without the class weights, with a warning at most)."""
    from conftest import tiny_class_unet
    from flexdiff.errors import FlexdiffError
    from flexdiff.models import load_model, save_model
    from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG

    folder = save_model(tiny_class_unet(), dict(DEFAULT_SCHEDULER_CONFIG), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_class_embeds": None}))
    with pytest.raises(FlexdiffError, match="no place for .*class_embedding"):
        load_model(folder)


def test_a_refused_training_rerun_names_the_setting_that_changed(tmp_path):
    from flexdiff.errors import FlexdiffError
    from flexdiff.models import build_default_unet
    from flexdiff.train import TrainConfig, train

    images, labels = torch.rand(8, 1, 16, 16) * 2 - 1, torch.arange(8) % 10
    train(build_default_unet(0), images, tmp_path / "run", TrainConfig(steps=1, batch_size=2, warmup=1), labels=labels)
    with pytest.raises(FlexdiffError, match=r"--lr 0.001 then, 0.002 now"):
        train(build_default_unet(0), images, tmp_path / "run", TrainConfig(steps=1, batch_size=2, warmup=1, lr=2e-3),
              labels=labels)


def test_a_named_model_that_is_not_shipped_is_one_clear_error(tmp_path, monkeypatch):
    from flexdiff.errors import FlexdiffError
    from flexdiff.models import NAMED_MODELS, load_model

    monkeypatch.chdir(tmp_path)  # an install whose package lacks the folder (a trimmed wheel, a damaged install)
    monkeypatch.setitem(NAMED_MODELS, "default-transformer", lambda: tmp_path / "missing" / "default_transformer")
    with pytest.raises(FlexdiffError, match="default-transformer: not shipped"):
        load_model("default-transformer")
