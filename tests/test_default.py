"""The artifacts shipped in the package: the default digits UNet and the quality classifier."""

import json

import torch
from typer.testing import CliRunner

from flexdiff.cli import app
from flexdiff.cost import measure_step_costs
from flexdiff.data import load_digits_split
from flexdiff.metrics.classifier import default_classifier_dir, load_classifier
from flexdiff.models import default_model_dir, load_model
from flexdiff.sampling import initial_noise, sample
from flexdiff.schedule import Schedule


def _assert_recognisable_digits(m, sampler: str) -> None:
    """100 unconditional samples (10 steps): the classifier is sure what most are, and all ten digits appear."""
    images = sample(m.unet, m.scheduler_config, Schedule.full(sampler, 10),
                    initial_noise(100, (1, 16, 16), seed=123)).images
    with torch.no_grad():
        probs = torch.softmax(load_classifier()(images.clamp(-1, 1)), 1)
    confidence, label = probs.max(1)
    assert confidence.median() > 0.95  # the classifier is sure what most samples are
    assert len(set(label.tolist())) == 10  # and all ten digits appear


def _assert_follows_labels(m, sampler: str) -> None:
    """Asked for each digit in turn (50 samples, guidance 2, 10 steps), the model draws that digit 90% of the time."""
    from flexdiff.sampling import class_conditioning

    cond = class_conditioning(m.unet, tuple(range(10)), 50, guidance=2.0)
    images = sample(m.unet, m.scheduler_config, Schedule.full(sampler, 10),
                    initial_noise(50, (1, 16, 16), seed=321), cond=cond).images
    with torch.no_grad():
        predicted = load_classifier()(images.clamp(-1, 1)).argmax(1)
    assert (predicted == cond.class_labels).float().mean() >= 0.9


def test_default_model_makes_recognisable_digits():
    _assert_recognisable_digits(load_model(), "dpmsolver++")


def test_shipped_classifier_accuracy_matches_its_card():
    x, y = load_digits_split("test")
    with torch.no_grad():
        acc = (load_classifier()(x).argmax(1) == y).float().mean().item()
    card = json.loads((default_classifier_dir() / "config.json").read_text())
    assert acc >= 0.98
    assert abs(acc - card["test_accuracy"]) < 1e-6


def test_model_card_matches_training_summary():
    card = (default_model_dir() / "README.md").read_text()
    summary = json.loads((default_model_dir() / "training_summary.json").read_text())
    assert "flexdiff train" in card and "--seed 0" in card
    assert f"{summary['final_loss_last200']:.4f}" in card
    assert "flexdiff evaluate" in card


def test_default_model_cost_and_branches():
    costs = measure_step_costs(load_model().unet)
    assert round(costs.full / 1e6, 1) == 61.7
    assert len(costs.partial) == 6 and costs.partial[0] < 0.15 * costs.full


def test_evaluate_command_on_default_model(tmp_path):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(app, ["evaluate", "--sampler", "ddim", "--steps", "5", "--teacher-steps", "8",
                                      "--samples", "40", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())["metrics"]
    assert {"cbfd", "class_tv", "cbfd_minus_teacher", "class_tv_minus_teacher", "precision", "recall", "fid", "kid",
            "fid_minus_teacher", "rfid", "teacher_distance"} <= set(metrics)
    assert 0 <= metrics["precision"]["value"] <= 1 and 0 <= metrics["recall"]["value"] <= 1
    assert metrics["rfid"]["value"] > 0


def test_default_model_follows_its_labels_with_guidance():
    """The shipped model is class-conditional: asked for each digit in turn, with guidance, it draws that digit."""
    _assert_follows_labels(load_model(), "dpmsolver++")


def test_transformer_default_makes_recognisable_digits_and_follows_labels():
    """The shipped FLUX-shaped default: a stock diffusers folder, digits the classifier recognises unconditionally,
    and each digit in turn with guidance."""
    from diffusers import FluxTransformer2DModel

    from flexdiff.models import default_transformer_dir

    FluxTransformer2DModel.from_pretrained(default_transformer_dir())  # loads alone
    m = load_model("default-transformer")
    _assert_recognisable_digits(m, "flow-dpmsolver++")
    _assert_follows_labels(m, "flow-dpmsolver++")


def test_transformer_default_card_matches_its_summary_and_cost():
    from flexdiff.models import default_transformer_dir

    card = (default_transformer_dir() / "README.md").read_text()
    summary = json.loads((default_transformer_dir() / "training_summary.json").read_text())
    step = summary["shipped_snapshot_step"]
    assert f"--steps {step}" in card and f"step-{step:06d}" in card and "--seed 0" in card
    assert f"{summary['final_loss_last200']:.3f}" in card
    costs = measure_step_costs(load_model("default-transformer").unet)
    assert round(costs.full / 1e6, 1) == 58.0 and len(costs.partial) == 8
