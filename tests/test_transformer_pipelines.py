"""Schedules inside diffusers' own transformer pipelines (DiT, PixArt-alpha, SD3, FLUX) through
`apply_schedule(pipe, schedule)`: the all-full schedule changes nothing, partial and null steps are counted per
call (batched guidance in one call, FLUX's true CFG in two), FLUX's t / 1000 and its resolution-dependent shift
stay in step, and a late start (SD3 img2img) runs its first step full. Tiny random-weight pipelines."""

import pytest
import torch

from flexdiff import apply_schedule
from flexdiff.errors import FlexdiffError
from flexdiff.schedule import FULL, NULL, Schedule, partial
from tiny_transformers import PIPELINES, run_pipeline

SAMPLER = {"dit": "ddim", "pixart": "ddim", "sd3": "flow-euler", "flux": "flow-euler"}
CALLS_PER_STEP = {"dit": 1, "pixart": 1, "sd3": 1, "flux": 2}  # FLUX's true CFG calls twice per step


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    out = {}
    for name, make in PIPELINES.items():
        pipe = make(folder / name)
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out


@pytest.mark.parametrize("name", list(PIPELINES))
def test_schedules_run_inside_the_pipeline(pipes, name):
    pipe, k = pipes[name], CALLS_PER_STEP[name]
    ref = torch.as_tensor(run_pipeline(name, pipe, 4))
    engine = apply_schedule(pipe, Schedule(SAMPLER[name], (FULL,) * 4))
    try:
        assert torch.equal(torch.as_tensor(run_pipeline(name, pipe, 4)), ref)
        assert engine.calls == {"full": 4 * k, "partial": 0, "null": 0}
        engine.set_schedule(Schedule(SAMPLER[name], (FULL, partial(0), NULL, FULL)))
        out = torch.as_tensor(run_pipeline(name, pipe, 4))
        assert engine.calls == {"full": 6 * k, "partial": k, "null": k}
        assert torch.isfinite(out).all() and not torch.equal(out, ref)
    finally:
        engine.detach()
    assert torch.equal(torch.as_tensor(run_pipeline(name, pipe, 4)), ref)  # restored exactly


def test_a_flow_schedule_refuses_a_noise_prediction_scheduler(pipes):
    pipe = pipes["dit"]
    with apply_schedule(pipe, Schedule("flow-euler", (FULL,) * 3)):
        with pytest.raises(FlexdiffError, match="flow-euler"):
            run_pipeline("dit", pipe, 3)


def test_sd3_img2img_late_start_runs_its_first_step_full(pipes):
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = StableDiffusion3Img2ImgPipeline(**pipes["sd3"].components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16)
    sched = Schedule("flow-euler", (FULL, partial(0), FULL, partial(1), NULL, partial(0), FULL, NULL))

    def run():
        return pipe(["a cat"], image=image, strength=0.5, num_inference_steps=8, guidance_scale=2.0,
                    max_sequence_length=8, generator=torch.Generator().manual_seed(0), output_type="latent").images

    with apply_schedule(pipe, sched) as engine:
        out = run()
    # steps 4..7 run: step 4 is null in the schedule but nothing is cached yet, so it runs full
    assert engine.calls == {"full": 2, "partial": 1, "null": 1}
    assert torch.isfinite(out).all()
