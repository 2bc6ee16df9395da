"""Transformer pipelines and bare transformer folders from the command line: DiT (labels), PixArt-alpha, SD3 and
FLUX (prompts through the pipeline's own encode_prompt, guidance in one batched call; FLUX's packed latents, its
resolution-dependent shift and true CFG), a flow-matching transformer
folder with label tokens (the default transformer's layout). Sampling and searching run; flexdiff's loop
reproduces the pipeline's own; bad input is one line, exit 2, nothing written."""

import json

import pytest
import torch

from flexdiff.schedule import Schedule
from test_cli import assert_user_error, run  # noqa: E402
from tiny_transformers import PIPELINES

CONDITION = {"dit": ("--labels", "3,5", "--sampler", "ddim"), "pixart": ("--prompt", "a cat", "--sampler", "ddim"),
             "sd3": ("--prompt", "a cat"), "flux": ("--prompt", "a cat")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from flexdiff.models import DEFAULT_LABEL_TOKENS, build_default_transformer, save_model
    from flexdiff.samplers import FLOW_SCHEDULER_CONFIG

    root = tmp_path_factory.mktemp("transformer-pipelines")
    out = {}
    for name in CONDITION:
        PIPELINES[name](root / f"{name}-tokenizer").save_pretrained(root / name)
        out[name] = root / name
    small = build_default_transformer(0, num_layers=1, num_single_layers=3)
    out["labels"] = save_model(small, FLOW_SCHEDULER_CONFIG, root / "labels", DEFAULT_LABEL_TOKENS)
    return out


@pytest.mark.parametrize("kind", list(CONDITION))
def test_sample_a_transformer_pipeline_with_a_partial_schedule(folders, kind, tmp_path):
    code, out = run("sample", "--model", folders[kind], "--n", 3, "--steps", 6, "--deepcache", 2, "--branch", 1,
                    "--guidance", 2, "--out", tmp_path / "grid.png", "--threads", 1, *CONDITION[kind])
    assert code == 0, out
    assert "3 full, 3 partial" in " ".join(out.split())
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.parametrize("kind", ["pixart", "sd3"])
def test_our_loop_reproduces_the_pipeline(folders, kind):
    from diffusers import DiffusionPipeline

    from flexdiff.models import load_model
    from flexdiff.samplers import default_sampler, make_scheduler
    from flexdiff.sampling import initial_noise, sample

    loaded = load_model(folders[kind])
    sampler = "ddim" if kind == "pixart" else default_sampler(loaded.scheduler_config)
    prompts, n, steps, g = ["a cat", "a red dog"], 2, 4, 3.0
    cond = loaded.parts.encode_prompts(prompts, n, negative="blurry", guidance=g)
    noise = initial_noise(n, (4, 8, 8), 0)
    ours = sample(loaded.unet, loaded.scheduler_config, Schedule.full(sampler, steps), noise, cond=cond).images
    pipe = DiffusionPipeline.from_pretrained(folders[kind], local_files_only=True)
    pipe.scheduler = make_scheduler(sampler, loaded.scheduler_config)
    extra = {"clean_caption": False, "use_resolution_binning": False} if kind == "pixart" else {}
    ref = pipe(prompt=prompts, negative_prompt=["blurry"] * n, num_inference_steps=steps, guidance_scale=g,
               latents=noise.clone(), output_type="latent", height=16, width=16, **extra).images
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_our_loop_reproduces_flux_with_its_packing_shift_and_true_cfg(folders):
    from diffusers import DiffusionPipeline

    from flexdiff.anatomy import call_anatomy, noise_shape
    from flexdiff.models import load_model
    from flexdiff.sampling import initial_noise, sample

    loaded = load_model(folders["flux"])
    assert noise_shape(loaded.unet) == (4, 128, 128)  # FluxPipeline's default size: 128 x 128 latents
    cond = loaded.parts.encode_prompts(["a cat", "a dog"], 2, negative="blurry", guidance=2.0)
    noise = initial_noise(2, noise_shape(loaded.unet), 0)
    ours = sample(loaded.unet, loaded.scheduler_config, Schedule.full("flow-euler", 3), noise, cond=cond).images
    pipe = DiffusionPipeline.from_pretrained(folders["flux"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    call = call_anatomy(loaded.unet)
    ref = pipe(["a cat", "a dog"], negative_prompt=["blurry"] * 2, true_cfg_scale=2.0, guidance_scale=1.0,
               num_inference_steps=3, latents=call.call_inputs(noise, torch.zeros(2))["hidden_states"],
               output_type="latent", height=256, width=256).images
    assert torch.allclose(ours, call.call_output(ref, noise), atol=1e-4)


def test_sample_and_search_a_flow_transformer_with_label_tokens(folders, tmp_path):
    code, out = run("sample", "--model", folders["labels"], "--n", 4, "--steps", 8, "--deepcache", 4, "--branch", 2,
                    "--labels", "all", "--guidance", 2, "--out", tmp_path / "g.png", "--threads", 1)
    assert code == 0, out
    assert "flow-euler-8 (2 full, 6 partial" in " ".join(out.split())
    code, out = run("search", "--model", folders["labels"], "--out", tmp_path / "s", "--population", 4,
                    "--generations", 1, "--eval-samples", 16, "--speedup", 3, "--threads", 1)
    assert code == 0, out
    best = json.loads((tmp_path / "s" / "best.json").read_text())
    assert best["sampler"] == "flow-dpmsolver++"


def test_a_transformer_folder_without_scheduler_config_is_refused(folders, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(folders["labels"], bare)
    (bare / "scheduler_config.json").unlink()
    code, out = run("sample", "--model", bare, "--n", 2, "--out", tmp_path / "g.png")
    assert_user_error(code, out, "scheduler_config.json", "cannot be guessed")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("args, fragment", [
    (("--sampler", "ddim"), "--sampler ddim: this is a flow-matching model; its samplers are flow-euler"),
    (("--deepcache", "2", "--branch", "7"), "uses branch 7, but this model has branches 0..2"),
])
def test_samplers_and_branches_that_do_not_fit_are_refused(folders, tmp_path, args, fragment):
    code, out = run("sample", "--model", folders["labels"], "--n", 2, "--steps", 4, "--out", tmp_path / "g.png", *args)
    assert_user_error(code, out, fragment)
    assert not (tmp_path / "g.png").exists()


def test_an_unsupported_denoiser_class_is_refused(folders, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folders["labels"], other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "_class_name": "HunyuanVideoTransformer3DModel"}))
    code, out = run("sample", "--model", other, "--n", 2, "--out", tmp_path / "g.png")
    assert_user_error(code, out, "HunyuanVideoTransformer3DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
