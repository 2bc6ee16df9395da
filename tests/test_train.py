"""Training: a killed run resumes from its checkpoint and ends with the same weights."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_unet
from flexdiff.errors import FlexdiffError
from flexdiff.models import load_model
from flexdiff.train import TrainConfig, train

CFG = TrainConfig(steps=8, batch_size=4, warmup=2, checkpoint_every=3, seed=1)


def _images():
    return torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


class Killed(Exception):
    pass


def _kill_at(step):
    def on_step(s, loss):
        if s == step:
            raise Killed
    return on_step


def test_resume_after_kill_gives_same_weights(tmp_path):
    train(tiny_unet(), _images(), tmp_path / "straight", CFG)
    with pytest.raises(Killed):
        train(tiny_unet(), _images(), tmp_path / "killed", CFG, on_step=_kill_at(5))
    assert not (tmp_path / "killed" / "config.json").exists()  # no model written by a killed run
    train(tiny_unet(), _images(), tmp_path / "killed", CFG)  # same command again
    a = load_model(tmp_path / "straight").unet.state_dict()
    b = load_model(tmp_path / "killed").unet.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_other_settings_is_refused(tmp_path):
    with pytest.raises(Killed):
        train(tiny_unet(), _images(), tmp_path / "o", CFG, on_step=_kill_at(4))
    with pytest.raises(FlexdiffError, match="other settings"):
        train(tiny_unet(), _images(), tmp_path / "o", TrainConfig(steps=9, batch_size=4, checkpoint_every=3))


def test_trained_folder_loads_with_diffusers(tmp_path):
    from diffusers import UNet2DModel

    summary = train(tiny_unet(), _images(), tmp_path / "m", CFG)
    assert np.isfinite(summary["final_loss_last200"])
    UNet2DModel.from_pretrained(tmp_path / "m")
    assert load_model(tmp_path / "m").scheduler_config["num_train_timesteps"] == 1000


def test_train_cli_on_image_folder(tmp_path):
    from typer.testing import CliRunner

    from flexdiff.cli import app

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    result = CliRunner().invoke(app, ["train", "--data", str(folder), "--out", str(tmp_path / "m"),
                                      "--steps", "2", "--batch-size", "2", "--resolution", "16"])
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "m").unet.config.in_channels == 3


def test_resume_on_other_data_is_refused(tmp_path):
    train(tiny_unet(), _images(), tmp_path / "d", CFG)
    with pytest.raises(FlexdiffError, match="other data"):
        train(tiny_unet(), _images() * 0.5, tmp_path / "d", CFG)


def test_a_diverging_fit_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """One guard in the fitting loop (training, experts, agent): a non-finite loss stops the run with its step,
    and nothing non-finite is saved; the checkpoint from before stays and resumes."""
    import pytest

    from flexdiff.errors import FlexdiffError
    from flexdiff.fit import Fit
    from flexdiff.io import load_checkpoint

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fit = Fit(tmp_path / "ck.pt", 6, opt, torch.Generator().manual_seed(0), {"model": model}, checkpoint_every=1,
              what="test run")

    def step_loss(step, gen):
        x = torch.randn(4, 3, generator=gen)
        loss = model(x).pow(2).mean() * (float("nan") if step == 3 else 1.0)
        loss.backward()
        return loss.item()

    with pytest.raises(FlexdiffError, match=r"test run diverged at step 4: the loss is nan; .*step 3\) is kept"):
        fit.run(step_loss)
    ck = load_checkpoint(tmp_path / "ck.pt")
    assert ck["step"] == 3 and all(torch.isfinite(v).all() for v in ck["model"].values())

    big = torch.optim.SGD(model.parameters(), lr=float("inf"))  # weights that leave the finite numbers
    fit = Fit(tmp_path / "ck2.pt", 3, big, torch.Generator().manual_seed(0), {"model": model}, checkpoint_every=1,
              what="test run", clip=None)
    with pytest.raises(FlexdiffError, match="diverged at step 1: the weights are no longer finite"):
        fit.run(lambda step, gen: step_loss(0, gen))
    assert not (tmp_path / "ck2.pt").exists()


def test_init_from_continues_a_model_and_is_part_of_the_runs_identity(tmp_path):
    """`flexdiff train --init-from FOLDER` starts from that model's weights (its snapshot step 0 is that model), the
    start is part of the run's identity (a checkpoint resumes only from the same one), and a model of another shape
    is refused with one line before anything is written."""
    from dataclasses import replace

    from typer.testing import CliRunner

    from flexdiff.cli import app
    from flexdiff.fingerprints import weights_fingerprint

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    common = ["train", "--data", str(folder), "--steps", "2", "--batch-size", "2", "--resolution", "16"]
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    start = load_model(tmp_path / "a").unet
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "a"),
                                      "--snapshot-every", "1"])
    assert result.exit_code == 0, result.output
    step0 = load_model(tmp_path / "b" / "snapshots" / "step-000000").unet
    assert weights_fingerprint(step0) == weights_fingerprint(start)
    summary = __import__("json").loads((tmp_path / "b" / "training_summary.json").read_text())
    assert summary["config"]["init_from"] == weights_fingerprint(start)
    assert weights_fingerprint(load_model(tmp_path / "b").unet) != weights_fingerprint(start)  # it trained on

    with pytest.raises(Killed):
        train(tiny_unet(), _images(), tmp_path / "c", replace(CFG, init_from="aaaa"), on_step=_kill_at(4))
    with pytest.raises(FlexdiffError, match="--init-from aaaa then, bbbb now"):
        train(tiny_unet(), _images(), tmp_path / "c", replace(CFG, init_from="bbbb"))

    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "d"), "--init-from", "default-transformer"])
    assert result.exit_code == 2 and "--init-from default-transformer" in result.output, result.output
    assert not (tmp_path / "d").exists()
