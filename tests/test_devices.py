"""Where the model runs: the library follows the model's device and dtype (bfloat16 end to end on tiny models
here; `make gpu-check` runs these on CUDA in float16 and bfloat16 through FLEXDIFF_TEST_DEVICE and
FLEXDIFF_TEST_DTYPE), with the seed's noise, the sampler's arithmetic and the metrics in float32."""

import os

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_class_unet, tiny_cond_unet, tiny_unet
from flexdiff.cli import app
from flexdiff.cost import count_macs, measure_latency, measure_step_costs, timing_machine
from flexdiff.devices import placement, resolve_device, resolve_dtype, timing_tag
from flexdiff.engine import StepEngine
from flexdiff.errors import FlexdiffError
from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG, make_scheduler
from flexdiff.sampling import class_conditioning, initial_noise, sample
from flexdiff.schedule import Schedule

DEVICE = torch.device(os.environ.get("FLEXDIFF_TEST_DEVICE", "cpu"))
BF16 = getattr(torch, os.environ.get("FLEXDIFF_TEST_DTYPE", "bfloat16"))  # the low dtype under test


def test_auto_and_named_devices_and_dtypes_on_this_machine():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu", 0) \
        if torch.cuda.is_available() else resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    for bad, option in (("cuda:x", "--device"), ("gpu", "--device")):
        with pytest.raises(FlexdiffError, match=f"{option} '{bad}'"):
            resolve_device(bad)
    with pytest.raises(FlexdiffError, match="accepted values are auto, float32, float16, bfloat16"):
        resolve_dtype("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(FlexdiffError, match="sees no CUDA GPU"):
            resolve_device("cuda")


def test_the_same_seed_gives_the_same_noise_whatever_the_model_runs_in():
    a = initial_noise(4, (1, 16, 16), seed=3)
    assert a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, initial_noise(4, (1, 16, 16), seed=3))


@pytest.mark.parametrize("schedule", [Schedule.full("ddim", 6), Schedule.deepcache("dpmsolver++", 6, 3, 0)],
                         ids=["ddim", "deepcache dpm++"])
def test_a_bfloat16_model_samples_close_to_its_float32_self(schedule):
    unet = tiny_class_unet()
    noise = initial_noise(4, (1, 16, 16), seed=0)
    cond = class_conditioning(unet, (0, 1), 4, guidance=2.0)
    ref = sample(unet, DEFAULT_SCHEDULER_CONFIG, schedule, noise, cond=cond).images
    half = sample(unet.to(DEVICE, BF16), DEFAULT_SCHEDULER_CONFIG, schedule, noise, cond=cond)
    assert half.images.dtype == torch.float32 and half.images.device.type == "cpu"  # metrics get float32
    assert placement(unet)[1] == BF16 and placement(unet)[0].type == DEVICE.type  # the model is left as it was
    err = (half.images - ref).abs().mean() / ref.abs().mean()
    assert 0 < err < 0.1, err  # bfloat16 rounding, nothing worse


def test_the_engine_caches_keep_the_models_dtype():
    unet = tiny_unet().to(DEVICE, BF16)
    schedule = Schedule.deepcache("ddim", 4, 2, 0)
    scheduler = make_scheduler("ddim", DEFAULT_SCHEDULER_CONFIG)
    scheduler.set_timesteps(4)
    x = torch.randn(2, 1, 16, 16)
    with StepEngine(unet, schedule, scheduler) as engine:
        for t in scheduler.timesteps[:2]:
            eps = unet(x.to(DEVICE, BF16), t).sample
            x = x.to(DEVICE)
            x = scheduler.step(eps.float(), t, x).prev_sample
        cached = [v for slot in engine.run.cache for v in slot if v is not None]
        tensors = [v for c in cached for v in (c if isinstance(c, tuple) else (c,)) if torch.is_tensor(v)]
        assert tensors and all(v.dtype == BF16 and v.device.type == DEVICE.type for v in tensors)
        assert engine.calls == {"full": 1, "partial": 1, "null": 0}


@pytest.mark.parametrize("make", [tiny_unet, tiny_cond_unet], ids=["unet2d", "text unet"])
def test_macs_and_latency_count_a_bfloat16_model(make):
    unet = make()
    full32 = count_macs(unet)
    costs32 = measure_step_costs(unet, cross_attention_len=8)
    unet = unet.to(DEVICE, BF16)
    assert count_macs(unet) == full32  # MACs do not depend on the dtype
    assert measure_step_costs(unet, cross_attention_len=8) == costs32
    assert measure_latency(unet, batch=2, repeats=1, cross_attention_len=8) > 0


def test_timings_are_keyed_by_device_and_dtype():
    cpu = torch.device("cpu")
    assert timing_machine(cpu, BF16) != timing_machine(cpu, torch.float32)
    assert timing_machine(cpu, BF16).endswith(timing_tag(cpu, BF16)) and str(BF16)[6:] in timing_tag(cpu, BF16)


def test_sample_evaluate_and_a_one_generation_search_run_in_bfloat16_from_the_command_line(tiny_model_dir, tmp_path):
    runner = CliRunner()
    common = ["--model", str(tiny_model_dir), "--device", str(DEVICE), "--dtype", str(BF16).removeprefix("torch.")]
    r = runner.invoke(app, ["sample", *common, "--steps", "3", "--n", "4", "--out", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "g.png").exists()
    r = runner.invoke(app, ["evaluate", *common, "--steps", "3", "--samples", "8", "--teacher-steps", "4"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", *common, "--speedup", "2", "--population", "4", "--generations", "1",
                            "--eval-samples", "8", "--steps", "4,5", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    state = (tmp_path / "s" / "search_state.json").read_text()
    assert f'"runs_on": "{DEVICE.type}-{str(BF16).removeprefix("torch.")}"' in state  # a float32 rerun into this folder is another search
    r = runner.invoke(app, ["search", "--model", str(tiny_model_dir), "--speedup", "2", "--population", "4",
                            "--generations", "1", "--eval-samples", "8", "--steps", "4,5", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "error:" in r.output


def test_training_in_bfloat16_keeps_float32_master_weights_and_its_identity(tmp_path):
    from flexdiff.models import build_default_unet
    from flexdiff.train import TrainConfig, train

    images = torch.rand(16, 1, 16, 16) * 2 - 1
    labels = torch.arange(16) % 10
    cfg = TrainConfig(steps=2, batch_size=4, checkpoint_every=1, warmup=1)
    unet = build_default_unet(0)
    summary = train(unet, images, tmp_path / "bf16", cfg, labels=labels, device=DEVICE, dtype=torch.bfloat16)
    assert summary["runs_on"] == f"{DEVICE.type}-bfloat16"
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in unet.parameters())
    with pytest.raises(FlexdiffError, match="trained on .*-bfloat16, now .*-float32"):
        train(build_default_unet(0), images, tmp_path / "bf16", TrainConfig(steps=3, batch_size=4, checkpoint_every=1,
                                                                             warmup=1), labels=labels, device=DEVICE)
    with pytest.raises(FlexdiffError, match="float16: training in float16 needs loss scaling"):
        train(build_default_unet(0), images, tmp_path / "f16", cfg, labels=labels, dtype=torch.float16)
