"""The command line: bad input answers with one clear line and a non-zero exit, never a traceback."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from flexdiff.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_user_error(code, output, *fragments):
    assert code == 2, output
    assert "Traceback" not in output
    text = " ".join(output.split())
    for f in fragments:
        assert f in text, (f, output)


def test_unknown_model_path(tmp_path):
    code, out = run("sample", "--model", tmp_path / "nope", "--out", tmp_path / "g.png")
    assert_user_error(code, out, "--model", "no such file or folder")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    code, out = run("sample", "--model", tmp_path / "m", "--out", tmp_path / "g.png")
    assert_user_error(code, out, "not a diffusers model folder")


def test_wrong_model_class(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    code, out = run("sample", "--model", tmp_path / "m", "--out", tmp_path / "g.png")
    assert_user_error(code, out, "'AutoencoderKL'", "UNet2DModel")


def test_corrupt_weights(tiny_model_dir, tmp_path):
    weights = next(tiny_model_dir.glob("*.safetensors"))
    weights.write_bytes(b"\x00garbage" * 100)
    code, out = run("sample", "--model", tiny_model_dir, "--out", tmp_path / "g.png")
    assert_user_error(code, out, "cannot load the weights")


@pytest.mark.parametrize(
    "steps, fragment",
    [
        (["null", "full"], "first step must be full"),
        (["full", "partial:99"], "uses branch 99"),
        (["full", "sometimes"], "unknown step kind"),
    ],
)
def test_invalid_schedule(tiny_model_dir, tmp_path, steps, fragment):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"sampler": "ddim", "steps": steps}))
    code, out = run("sample", "--model", tiny_model_dir, "--schedule", path, "--out", tmp_path / "g.png")
    assert_user_error(code, out, fragment)


def test_image_folder_without_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.txt").write_text("hi")
    code, out = run("train", "--data", tmp_path / "imgs", "--out", tmp_path / "o", "--steps", 1)
    assert_user_error(code, out, "no images found")


def test_unknown_sampler_and_preset(tiny_model_dir, tmp_path):
    code, out = run("sample", "--model", tiny_model_dir, "--sampler", "plms", "--out", tmp_path / "g.png")
    assert_user_error(code, out, "--sampler 'plms'", "ddim, dpmsolver++, euler")
    code, out = run("bench", "--model", tiny_model_dir, "--preset", "huge", "--out", tmp_path / "b")
    assert_user_error(code, out, "--preset 'huge'", "quick, full")
    code, out = run("bench", "--model", tiny_model_dir, "--ddim-steps", "5,x", "--out", tmp_path / "b")
    assert_user_error(code, out, "--ddim-steps '5,x'")


def test_inception_weights_missing(tiny_model_dir, tmp_path):
    code, out = run("evaluate", "--model", tiny_model_dir, "--steps", 2, "--samples", 4,
                    "--inception-weights", tmp_path / "none.pth")
    assert_user_error(code, out, "--inception-weights", "no such file")


def test_conditional_model_needs_conditioning(tmp_path, cond_unet, sched_cfg):
    from flexdiff.models import save_model

    path = save_model(cond_unet, sched_cfg, tmp_path / "cond")
    code, out = run("sample", "--model", path, "--steps", 2, "--out", tmp_path / "g.png")
    assert_user_error(code, out, "--cond")


def test_sample_writes_grid_and_tensors(tiny_model_dir, tmp_path):
    code, out = run("sample", "--model", tiny_model_dir, "--steps", 4, "--deepcache", 2, "--branch", 1,
                    "--n", 6, "--out", tmp_path / "g.png", "--save-tensors", tmp_path / "x.safetensors")
    assert code == 0, out
    assert Image.open(tmp_path / "g.png").size[0] > 16
    from safetensors.torch import load_file

    assert load_file(tmp_path / "x.safetensors")["images"].shape == (6, 1, 16, 16)


def test_sample_conditional_with_cond_file(tmp_path, cond_unet, sched_cfg):
    import torch
    from safetensors.torch import save_file

    from flexdiff.models import save_model

    path = save_model(cond_unet, sched_cfg, tmp_path / "cond")
    save_file({"encoder_hidden_states": torch.randn(1, 5, 12)}, tmp_path / "c.safetensors")
    code, out = run("sample", "--model", path, "--steps", 3, "--deepcache", 2, "--n", 2, "--guidance", 2.0,
                    "--cond", tmp_path / "c.safetensors", "--out", tmp_path / "g.png")
    assert code == 0, out
    assert (tmp_path / "g.png").exists()


def test_error_text_with_brackets_is_printed_verbatim(tiny_model_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    code, out = run("evaluate", "--model", tiny_model_dir, "--steps", 2, "--samples", 4,
                    "--inception-weights", weights)
    assert_user_error(code, out, "pip install 'flexdiff[inception]'")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_threads_below_one_is_refused(tiny_model_dir, tmp_path, value):
    code, out = run("sample", "--model", tiny_model_dir, "--threads", value, "--out", tmp_path / "g.png")
    assert_user_error(code, out, f"--threads {value}", "at least 1")
    assert not (tmp_path / "g.png").exists()
