"""Real pipeline shapes from the command line: tiny random-weight Stable Diffusion, SDXL, LDM (VQModel)
and DDPM 32x32 RGB pipelines, built from configs in the test run. Samples are decoded images, prompts
are encoded by the pipeline's own encoders, and an all-full schedule reproduces the plain pipeline."""

import pytest
import torch
from safetensors.torch import load_file

import tiny_pipelines
from flexdiff.schedule import Schedule
from test_cli import assert_user_error, run  # noqa: E402


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {k: build(root / k) for k, build in tiny_pipelines.BUILDERS.items()}


@pytest.mark.parametrize("kind", list(tiny_pipelines.BUILDERS))
def test_sample_writes_decoded_images(pipelines, kind, tmp_path):
    code, out = run("sample", "--model", pipelines[kind], "--n", 3, "--steps", 4, "--deepcache", 2,
                    "--out", tmp_path / "grid.png", "--save-tensors", tmp_path / "s.safetensors", "--threads", 1,
                    *tiny_pipelines.CONDITION[kind])
    assert code == 0, out
    saved = load_file(tmp_path / "s.safetensors")
    assert tuple(saved["images"].shape) == (3, *tiny_pipelines.IMAGE[kind])
    if kind not in ("ddpm", "classcond"):  # a latent model: the raw latents are kept beside the decoded images
        assert saved["latents"].shape[-1] == 8 and saved["images"].abs().max() <= 1
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_prompts_and_guidance_reproduce_the_plain_pipeline(pipelines, kind):
    from diffusers import DiffusionPipeline

    from flexdiff.models import load_model
    from flexdiff.samplers import make_scheduler
    from flexdiff.sampling import initial_noise, sample

    loaded = load_model(pipelines[kind])
    prompts, n, steps, g = ["a cat", "a red dog"], 2, 4, 3.0
    cond = loaded.parts.encode_prompts(prompts, n, negative="blurry", guidance=g)
    noise = initial_noise(n, (4, 8, 8), 0)
    ours = loaded.decode(sample(loaded.unet, loaded.scheduler_config, Schedule.full("ddim", steps), noise,
                                cond=cond).images)
    pipe = DiffusionPipeline.from_pretrained(pipelines[kind], local_files_only=True)
    pipe.scheduler = make_scheduler("ddim", loaded.scheduler_config)
    ref = pipe(prompt=prompts, negative_prompt=["blurry"] * n, num_inference_steps=steps, guidance_scale=g,
               latents=noise.clone(), output_type="pt").images
    assert torch.allclose((ours + 1) / 2, ref.clamp(0, 1), atol=1e-4)


@pytest.mark.parametrize("args, fragment", [
    (("--prompt", "a cat"), "--prompt/--prompts/--negative-prompt: the model at"),
    (("--prompts", "missing.txt"), "--prompts missing.txt: no such file"),
])
def test_prompts_on_a_model_without_text_encoder_are_refused(pipelines, tmp_path, args, fragment):
    code, out = run("sample", "--model", pipelines["ldm"], "--n", 2, "--steps", 2, "--out", tmp_path / "g.png", *args)
    assert_user_error(code, out, fragment)


def test_sdxl_refuses_a_cond_file_without_added_conditions(pipelines, tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder_hidden_states": torch.zeros(1, 16, 64)}, str(tmp_path / "c.safetensors"))
    code, out = run("sample", "--model", pipelines["sdxl"], "--n", 2, "--steps", 2, "--out", tmp_path / "g.png",
                    "--cond", tmp_path / "c.safetensors")
    assert_user_error(code, out, "added conditions")


@pytest.mark.parametrize("kind", list(tiny_pipelines.BUILDERS))
def test_evaluate_and_search_need_no_real_data(pipelines, kind, tmp_path):
    import json

    text = tiny_pipelines.CONDITION[kind]
    code, out = run("evaluate", "--model", pipelines[kind], "--samples", 4, "--deepcache", 2, "--steps", 10,
                    "--teacher-steps", 10, "--out", tmp_path / "e.json", "--threads", 1, *text)
    assert code == 0, out
    metrics = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert set(metrics) == {"teacher psnr", "teacher ssim", "teacher rmse"}
    assert 0 < metrics["teacher ssim"]["value"] <= 1 and metrics["teacher rmse"]["value"] > 0
    code, out = run("search", "--model", pipelines[kind], "--out", tmp_path / "s", "--budget", 0.3, "--population", 3,
                    "--generations", 1, "--eval-samples", 8, "--steps", "4,6", "--threads", 1, *text)
    assert code == 0, out
    best = Schedule.load(tmp_path / "s" / "best.json")
    assert best.meta["speedup_macs"] >= 1 / 0.3 - 1e-9


def test_search_without_real_data_refuses_a_real_data_metric(pipelines, tmp_path):
    code, out = run("search", "--model", pipelines["ldm"], "--out", tmp_path / "s", "--budget", 0.3,
                    "--metric", "fid", "--eval-samples", 8)
    assert_user_error(code, out, "--metric fid")


@pytest.mark.parametrize("kind", list(tiny_pipelines.BUILDERS))
def test_bench_tiny_preset_on_any_model(pipelines, kind, tmp_path):
    import json

    text = tiny_pipelines.CONDITION[kind]
    code, out = run("bench", "--model", pipelines[kind], "--out", tmp_path / "b", "--samples", 4, "--teacher-steps", 6,
                    "--ddim-steps", "3", "--dpm-steps", "3", "--deepcache", "2", "--deepcache-branches", "0",
                    "--search-budgets", "0.5", "--search-generations", 1, "--search-population", 2,
                    "--search-eval-samples", 8, "--expert-budgets", "none", "--threads", 1, *text)
    assert code == 0, out
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["teacher DDIM-6"]["metrics"] == {} and result["headline"] == "distance"
    assert all(0 < r["metrics"]["teacher ssim"]["value"] <= 1 for r in result["rows"][1:])
    assert any(r["family"] == "flexiffusion" for r in result["rows"])
    assert "PSNR to teacher" in (tmp_path / "b" / "bench.md").read_text()
    assert (tmp_path / "b" / "bench.png").stat().st_size > 0 and (tmp_path / "b" / "samples.png").stat().st_size > 0


def test_experts_on_a_latent_model_train_on_latents_and_decode(pipelines, tmp_path):
    import numpy as np
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(data / f"{i}.png")
    code, out = run("experts", "--model", pipelines["ldm"], "--data", data, "--out", tmp_path / "exp", "--k", 2,
                    "--elastic-steps", 2, "--agent-steps", 2, "--final-steps", 2, "--batch-size", 4, "--budget", 0.7,
                    "--threads", 1)
    assert code == 0, out
    import json
    import shutil

    # the mixture folder holds the decoder it needs: a copy elsewhere, with the original pipeline gone, samples
    mixture = tmp_path / "exp" / "budget-0.7" / "mixture"
    assert json.loads((mixture / "mixture.json").read_text())["pipeline"] == "pipeline"
    moved = shutil.copytree(mixture, tmp_path / "elsewhere" / "mixture")
    shutil.move(str(pipelines["ldm"]), str(tmp_path / "ldm-gone"))
    try:
        code, out = run("sample", "--model", moved, "--n", 2, "--steps", 4,
                        "--out", tmp_path / "m.png", "--save-tensors", tmp_path / "m.safetensors")
    finally:
        shutil.move(str(tmp_path / "ldm-gone"), str(pipelines["ldm"]))
    assert code == 0, out
    saved = load_file(tmp_path / "m.safetensors")  # the mixture's latents go through the LDM's VQ-VAE
    assert tuple(saved["images"].shape) == (2, 3, 16, 16) and tuple(saved["latents"].shape) == (2, 3, 8, 8)
    man = json.loads((moved / "mixture.json").read_text())
    (moved / "mixture.json").write_text(json.dumps({**man, "pipeline": str(pipelines["ldm"])}))  # a path outside
    code, out = run("sample", "--model", moved, "--n", 2, "--steps", 4, "--out", tmp_path / "m2.png")
    assert code == 2 and "must name a subfolder of the mixture folder" in out


def test_evaluate_reports_the_clip_score_of_the_prompts(pipelines, tmp_path):
    import json

    clip = tiny_pipelines.clip_model(tmp_path / "clip")
    code, out = run("evaluate", "--model", pipelines["sd"], "--samples", 4, "--deepcache", 2, "--steps", 6,
                    "--teacher-steps", 6, "--prompt", "a cat", "--prompt", "a dog", "--clip-model", clip,
                    "--out", tmp_path / "e.json", "--threads", 1)
    assert code == 0, out
    metrics = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert 0 <= metrics["clip score"]["value"] <= 100
    assert "clip score - teacher (paired)" in metrics
    code, out = run("evaluate", "--model", pipelines["sd"], "--samples", 4, "--steps", 6, "--teacher-steps", 8,
                    "--clip-model", tmp_path / "nowhere")
    assert_user_error(code, out, "--clip-model")
