"""The README's Python snippets run as written, on tiny random-weight stand-ins for the folders they name
(a Stable Diffusion pipeline, a searched schedule with its own timesteps, the shipped mixture), so they
cannot rot."""

import re
import shutil
from pathlib import Path

import pytest
import torch

import tiny_pipelines
from flexdiff.models import default_mixture_dir, load_model
from flexdiff.schedule import FULL, NULL, Schedule, partial

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_the_snippets_this_test_runs():
    names = [s for s in _snippets()]
    assert len(names) >= 3
    assert any("StableDiffusionPipeline" in s for s in names)
    assert any("ElasticUNet" in s for s in names)
    assert any("StableDiffusion3Pipeline" in s for s in names)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder laid out as the README's snippets expect, made of tiny stand-ins."""
    tiny_pipelines.stable_diffusion(tmp_path / "stable-diffusion-v1-5")
    searched = Schedule("dpmsolver++", (FULL, partial(0), NULL, FULL, partial(1), NULL),
                        timesteps=(999, 800, 600, 400, 200, 50), name="searched")  # as search --ends makes them
    (tmp_path / "runs" / "sd-search").mkdir(parents=True)
    searched.save(tmp_path / "runs" / "sd-search" / "best.json")
    shutil.copytree(default_mixture_dir(), tmp_path / "runs" / "experts" / "budget-0.5" / "mixture")
    import tiny_transformers

    tiny_transformers.sd3_pipeline(tmp_path / "sd3-tokenizer").save_pretrained(tmp_path / "stable-diffusion-3-medium")
    (tmp_path / "runs" / "sd3-search").mkdir(parents=True)
    Schedule("flow-dpmsolver++", (FULL, partial(0), NULL, FULL, partial(2), NULL),
             name="searched").save(tmp_path / "runs" / "sd3-search" / "best.json")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tiny_sd(folder: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("index", range(4))
def test_readme_snippet_runs(workdir, index):
    snippets = _snippets()
    if index >= len(snippets):
        pytest.skip("fewer snippets")
    code = snippets[index]
    code = code.replace('"a red bicycle"', '"a red bicycle", output_type="pt", height=16, width=16')
    namespace = {"prompt": "a cat"}
    if "pipe(" in code and "StableDiffusionPipeline" not in code:  # the Python API snippet works on `pipe`
        namespace["pipe"] = _tiny_sd(workdir / "stable-diffusion-v1-5")
        code = code.replace("pipe(prompt,", "pipe(prompt, output_type='pt', height=16, width=16,")
    if "ElasticUNet(unet)" in code:
        namespace["unet"] = load_model().unet
    exec(compile(code, f"README.md snippet {index}", "exec"), namespace)
    out = namespace.get("image", namespace.get("images"))
    if out is not None:
        assert torch.isfinite(torch.as_tensor(out)).all()
    if "small" in namespace:
        assert Path("small-unet/config.json").exists()


def test_a_searched_schedule_with_timesteps_runs_through_the_pipelines_timesteps_argument(workdir):
    """diffusers' retrieve_timesteps inspects scheduler.set_timesteps for `timesteps`: the engine's wrapper keeps
    the signature, and the images equal those of the same schedule run by flexdiff's engine on the bare UNet."""
    import inspect

    from flexdiff import apply_schedule
    from flexdiff.samplers import make_scheduler

    pipe = _tiny_sd(workdir / "stable-diffusion-v1-5")
    schedule = Schedule.load(Path("runs/sd-search/best.json"))
    pipe.scheduler = make_scheduler(schedule.sampler, pipe.scheduler.config)
    plain = Schedule("dpmsolver++", (FULL,) * 6, timesteps=schedule.timesteps)

    def call():
        return pipe("a cat", guidance_scale=3.0, output_type="pt", height=16, width=16,
                    generator=torch.Generator().manual_seed(0), **schedule.pipeline_kwargs()).images

    with apply_schedule(pipe, plain):
        assert "timesteps" in inspect.signature(pipe.scheduler.set_timesteps).parameters
        assert "generator" in inspect.signature(pipe.scheduler.step).parameters
        all_full = call()
    reference = pipe("a cat", guidance_scale=3.0, output_type="pt", height=16, width=16,
                     generator=torch.Generator().manual_seed(0), timesteps=list(schedule.timesteps)).images
    assert torch.allclose(all_full, reference, atol=1e-6)  # the hooks change nothing on an all-full schedule
    with apply_schedule(pipe, schedule) as engine:
        fast = call()
        assert engine.calls == {"full": 2, "partial": 2, "null": 2}
    assert not torch.allclose(fast, reference)
    with apply_schedule(pipe, schedule):
        with pytest.raises(Exception, match="timesteps=list"):  # the pipeline's own spacing: refused with the fix
            pipe("a cat", output_type="pt", height=16, width=16, num_inference_steps=6)


def test_a_scheduler_swapped_after_apply_schedule_is_followed(workdir):
    from flexdiff import apply_schedule
    from flexdiff.errors import FlexdiffError
    from flexdiff.samplers import make_scheduler

    pipe = _tiny_sd(workdir / "stable-diffusion-v1-5")
    schedule = Schedule.deepcache("dpmsolver++", 6, 3, 0)
    kwargs = dict(guidance_scale=3.0, output_type="pt", height=16, width=16, num_inference_steps=6)
    with apply_schedule(pipe, schedule) as engine:
        with pytest.raises(FlexdiffError, match="make_scheduler"):  # DDIM in the pipeline: refused with the fix
            pipe("a cat", **kwargs)
        pipe.scheduler = make_scheduler("dpmsolver++", pipe.scheduler.config)  # swapped inside the with
        swapped = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
        assert engine.calls["partial"] == 4
    pipe.scheduler = make_scheduler("dpmsolver++", pipe.scheduler.config)
    with apply_schedule(pipe, schedule):
        before = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(swapped, before)
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)  # nothing left behind
