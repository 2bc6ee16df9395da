"""ControlNet pipelines: the schedule runs through diffusers' own StableDiffusionControlNetPipeline, the
ControlNet is skipped on null steps, and its MACs are part of every step's cost."""

import pytest
import torch

import tiny_pipelines
from flexdiff import Schedule, apply_schedule
from flexdiff.cost import measure_step_costs
from flexdiff.samplers import make_scheduler
from flexdiff.schedule import FULL, NULL, partial

N = 6


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import StableDiffusionControlNetPipeline

    folder = tiny_pipelines.stable_diffusion_controlnet(tmp_path_factory.mktemp("cn") / "sd-controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = make_scheduler("dpmsolver++", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, image, **kw):
    return pipe("a cat", image=image, num_inference_steps=N, guidance_scale=3.0, output_type="pt", height=16, width=16,
                generator=torch.Generator().manual_seed(0), **kw).images


def test_a_schedule_runs_through_the_controlnet_pipeline_and_skips_the_controlnet_on_null_steps(pipe):
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    plain = _call(pipe, image)
    with apply_schedule(pipe, Schedule.full("dpmsolver++", N)) as engine:
        assert torch.allclose(_call(pipe, image), plain, atol=1e-6)  # an all-full schedule is the plain pipeline
        assert engine.side_calls == N
    other_control = _call(pipe, torch.zeros(1, 3, 16, 16))
    assert not torch.allclose(other_control, plain, atol=1e-3)  # the control matters in this tiny pipeline
    schedule = Schedule("dpmsolver++", (FULL, partial(0), NULL, FULL, NULL, partial(1)))
    with apply_schedule(pipe, schedule) as engine:
        first, second = _call(pipe, image), _call(pipe, image)
        assert engine.calls == {"full": 4, "partial": 4, "null": 4}
        assert engine.side_calls == 2 * 4  # run on full and partial steps only
    assert torch.equal(first, second)


def test_the_controlnets_macs_count_on_full_and_partial_steps_not_on_null_steps(pipe):
    alone = measure_step_costs(pipe.unet, guidance=True, cross_attention_len=16)
    with_cn = measure_step_costs(pipe.unet, guidance=True, cross_attention_len=16, controlnet=pipe.controlnet)
    assert with_cn.side > 0 and alone.side == 0
    schedule = Schedule("dpmsolver++", (FULL, partial(0), NULL, FULL, NULL, partial(1)))
    teacher = Schedule.full("dpmsolver++", N)
    extra = 2 * with_cn.side  # guidance: both branches
    assert with_cn.schedule_macs(teacher) == pytest.approx(alone.schedule_macs(teacher) + N * extra)
    assert with_cn.schedule_macs(schedule) == pytest.approx(alone.schedule_macs(schedule) + 4 * extra)
    # the honest speed-up (the ControlNet's cost included) is smaller than the UNet's alone
    assert with_cn.schedule_macs(teacher) / with_cn.schedule_macs(schedule) < \
        alone.schedule_macs(teacher) / alone.schedule_macs(schedule)


def test_the_command_line_refuses_a_controlnet_pipeline_folder_instead_of_dropping_the_control(tmp_path):
    from typer.testing import CliRunner

    from flexdiff.cli import app

    folder = tiny_pipelines.stable_diffusion_controlnet(tmp_path / "sd-controlnet")
    r = CliRunner().invoke(app, ["sample", "--model", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "g.png")])
    assert r.exit_code == 2 and "steered by a ControlNet" in r.stderr and "apply_schedule" in r.stderr
    assert not (tmp_path / "g.png").exists()
