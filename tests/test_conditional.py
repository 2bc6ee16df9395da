"""Class-conditional models: training with label dropout, labels and guidance through sampling and the CLI."""

import copy

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_class_unet
from flexdiff.cli import app
from flexdiff.errors import FlexdiffError
from flexdiff.models import load_model
from flexdiff.sampling import Conditioning, class_conditioning, initial_noise, parse_labels, sample
from flexdiff.schedule import Schedule
from flexdiff.train import TrainConfig, debiased_ema, train

runner = CliRunner()


def _data(n=12):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.arange(n) % 3


def test_unconditional_sampling_uses_the_null_label(sched_cfg):
    unet = tiny_class_unet()
    noise = initial_noise(3, (1, 16, 16), 0)
    ours = sample(unet, sched_cfg, Schedule.full("ddim", 4), noise).images
    explicit = sample(unet, sched_cfg, Schedule.full("ddim", 4), noise,
                      cond=Conditioning(class_labels=torch.tensor([3]), null_label=3)).images
    assert torch.equal(ours, explicit)
    other = sample(unet, sched_cfg, Schedule.full("ddim", 4), noise,
                   cond=Conditioning(class_labels=torch.tensor([0]), null_label=3)).images
    assert not torch.equal(ours, other)  # the label reaches the network


def test_guidance_matches_a_plain_loop(sched_cfg):
    from flexdiff.samplers import make_scheduler

    unet = tiny_class_unet()
    noise = initial_noise(4, (1, 16, 16), 1)
    labels = torch.tensor([0, 1, 2, 0])
    ours = sample(unet, sched_cfg, Schedule.full("ddim", 5), noise,
                  cond=class_conditioning(unet, (0, 1, 2), 4, guidance=3.0)).images
    sched = make_scheduler("ddim", sched_cfg)
    sched.set_timesteps(5)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps_u = unet(x, t, class_labels=torch.full((4,), 3)).sample
            eps_c = unet(x, t, class_labels=labels).sample
            x = sched.step(eps_u + 3.0 * (eps_c - eps_u), t, x).prev_sample
    assert (ours - x).abs().max() <= 1e-5


def test_labels_are_checked_against_the_model(unet):
    assert parse_labels("all", 10) == tuple(range(10))
    assert parse_labels("3, 7", 10) == (3, 7)
    for bad in ("10", "-1", "x", ""):
        with pytest.raises(FlexdiffError, match="--labels"):
            parse_labels(bad, 10)
    with pytest.raises(FlexdiffError, match="only for class-conditional"):
        class_conditioning(unet, (1,), 4)
    with pytest.raises(FlexdiffError, match="--guidance needs --labels"):
        class_conditioning(tiny_class_unet(), (), 4, guidance=2.0)


def test_class_conditional_training_needs_valid_labels(tmp_path):
    images, labels = _data()
    cfg = TrainConfig(steps=2, batch_size=4, warmup=1)
    with pytest.raises(FlexdiffError, match="label per image"):
        train(tiny_class_unet(), images, tmp_path / "a", cfg)
    with pytest.raises(FlexdiffError, match="0..2"):
        train(tiny_class_unet(), images, tmp_path / "b", cfg, labels=labels + 1)


def test_constant_rate_run_extends_to_the_same_weights(tmp_path):
    """A finished constant-rate run raised to more steps resumes; it equals a straight longer run."""
    images, labels = _data()
    short = TrainConfig(steps=4, batch_size=4, warmup=2, checkpoint_every=2, lr_schedule="constant", snapshot_every=2)
    longer = TrainConfig(**{**short.__dict__, "steps": 6})
    train(tiny_class_unet(), images, tmp_path / "ext", short, labels=labels)
    assert (tmp_path / "ext" / "snapshots" / "step-000004").is_dir()
    train(tiny_class_unet(), images, tmp_path / "ext", longer, labels=labels)
    train(tiny_class_unet(), images, tmp_path / "straight", longer, labels=labels)
    a = load_model(tmp_path / "ext").unet.state_dict()
    b = load_model(tmp_path / "straight").unet.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cosine = TrainConfig(**{**short.__dict__, "lr_schedule": "cosine"})
    train(tiny_class_unet(), images, tmp_path / "cos", cosine, labels=labels)
    with pytest.raises(FlexdiffError, match="other settings"):  # a cosine schedule depends on its length
        train(tiny_class_unet(), images, tmp_path / "cos", TrainConfig(**{**cosine.__dict__, "steps": 6}), labels=labels)


def test_debiased_ema_removes_the_initial_weights():
    """With every trained weight equal to w, the corrected EMA is exactly w, whatever the decay and step."""
    unet = tiny_class_unet()
    init = {k: v.clone() for k, v in unet.named_parameters()}
    target = {k: torch.randn_like(v) for k, v in init.items()}
    ema = copy.deepcopy(unet)
    decay, steps = 0.9, 7
    with torch.no_grad():
        for _ in range(steps):
            for k, p in ema.named_parameters():
                p.lerp_(target[k], 1 - decay)
    fixed = debiased_ema(ema, init, decay, steps)
    for k, p in fixed.named_parameters():
        assert torch.allclose(p, target[k], atol=1e-5), k
        assert not torch.allclose(dict(ema.named_parameters())[k], target[k], atol=1e-3)


def test_cli_labels_and_guidance(class_model_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "g.png"
    r = runner.invoke(app, ["sample", "--model", str(class_model_dir), "--n", "3", "--steps", "3",
                            "--labels", "0,2", "--guidance", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.exists()
    for args, fragment in (
        (["--model", str(class_model_dir), "--labels", "5"], "0..2"),
        (["--model", str(class_model_dir), "--guidance", "2"], "--guidance needs --labels"),
        (["--model", str(tiny_model_dir), "--labels", "1"], "has no class labels"),
        (["--model", str(tiny_model_dir), "--guidance", "2"], "--guidance needs a conditional model"),
    ):
        r = runner.invoke(app, ["sample", "--n", "2", "--steps", "2", "--out", str(tmp_path / "x.png"), *args])
        assert r.exit_code == 2, r.output
        assert fragment in " ".join(r.output.split()), r.output
        assert "Traceback" not in r.output


def test_cost_counts_class_conditional_models():
    from flexdiff.cost import measure_step_costs

    unet = tiny_class_unet()
    plain = measure_step_costs(unet)
    guided = measure_step_costs(unet, guidance=True)
    sched = Schedule.full("ddim", 4)
    assert guided.schedule_macs(sched) == pytest.approx(2 * plain.schedule_macs(sched))
    assert plain.full > plain.partial[-1] > plain.partial[0] > 0


def test_evaluate_search_bench_with_labels_and_guidance(class_model_dir, tmp_path):
    import json

    cond = ["--labels", "all", "--guidance", "2"]
    r = runner.invoke(app, ["evaluate", "--model", str(class_model_dir), "--steps", "3", "--teacher-steps", "4",
                            "--samples", "12", "--out", str(tmp_path / "e.json"), *cond])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["headline"] == "cbfd" and "cbfd_minus_teacher" in report["metrics"]
    r = runner.invoke(app, ["search", "--model", str(class_model_dir), "--speedup", "2", "--out", str(tmp_path / "s"),
                            "--population", "3", "--generations", "1", "--eval-samples", "8", "--steps", "4,6",
                            "--lengths", "1,2", "--ends", "0", *cond])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "search_state.json").read_text())["identity"]["config"]["labels"] == [0, 1, 2]
    r = runner.invoke(app, ["bench", "--model", str(class_model_dir), "--samples", "12", "--teacher-steps", "4",
                            "--ddim-steps", "2", "--dpm-steps", "2", "--deepcache", "2", "--deepcache-branches", "0",
                            "--search-budgets", "none", "--expert-budgets", "none", "--out", str(tmp_path / "b"), *cond])
    assert r.exit_code == 0, r.output
    bench = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert bench["config"]["labels"] == [0, 1, 2] and bench["config"]["guidance"] == 2.0
    assert "guidance 2" in (tmp_path / "b" / "bench.md").read_text()
