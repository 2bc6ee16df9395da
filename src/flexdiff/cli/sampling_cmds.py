"""flexdiff sample | evaluate: draw with a schedule; measure quality against real data and the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import FlexdiffError
from .app import (
    BranchOpt,
    DeepCacheOpt,
    DeviceOpt,
    DtypeOpt,
    GuidanceOpt,
    LabelsOpt,
    ModelOpt,
    NegativeOpt,
    PromptOpt,
    PromptsOpt,
    SamplerOpt,
    ScheduleOpt,
    StepsOpt,
    app,
    check_output_file,
    check_schedule_options,
    conditioning_from_options,
    console,
    placement_from_options,
    progress_bar,
    prompts_from_options,
    resolve_schedule,
    set_threads,
    user_errors,
)


@app.command("sample")
@user_errors
def sample_cmd(
    out: Path = typer.Option(Path("samples.png"), "--out", help="PNG grid to write."),
    model: Optional[Path] = ModelOpt,
    schedule: Optional[Path] = ScheduleOpt,
    sampler: Optional[str] = SamplerOpt,
    steps: Optional[int] = StepsOpt,
    deepcache: Optional[int] = DeepCacheOpt,
    branch: Optional[int] = BranchOpt,
    n: int = typer.Option(64, "--n", min=1, help="Number of images."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the initial noise."),
    cond: Optional[Path] = typer.Option(None, "--cond", help="Conditional UNets: safetensors with 'encoder_hidden_states' [and 'negative']."),
    labels: Optional[str] = LabelsOpt,
    guidance: float = GuidanceOpt,
    prompt: Optional[list[str]] = PromptOpt,
    prompts: Optional[Path] = PromptsOpt,
    negative_prompt: Optional[str] = NegativeOpt,
    save_tensors: Optional[Path] = typer.Option(None, "--save-tensors", help="Also save the images (and a latent model's raw latents) as safetensors."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Draw samples with a schedule (or a plain sampler) and write a PNG grid."""
    from ..anatomy import noise_shape
    from ..cost import measure_step_costs
    from ..grids import save_grid
    from ..models import load_model
    from ..sampling import initial_noise, sample

    set_threads(threads)
    placed = placement_from_options(device, dtype)
    check_schedule_options(schedule, sampler, steps, deepcache, branch)
    check_output_file(out, "--out")
    if out.suffix.lower() != ".png":
        raise FlexdiffError(f"--out {out}: the sample grid is a PNG; give a name ending in .png")
    check_output_file(save_tensors, "--save-tensors")
    loaded = load_model(model, device=placed[0], dtype=placed[1])
    sched = resolve_schedule(schedule, sampler, steps, deepcache, branch, loaded)
    conditioning = conditioning_from_options(loaded, cond, labels, guidance, n,
                                             prompts_from_options(prompt, prompts), negative_prompt)
    noise = initial_noise(n, noise_shape(loaded.unet), seed)
    with progress_bar() as progress:
        result = sample(loaded.unet, loaded.scheduler_config, sched, noise, cond=conditioning,
                        progress=progress, description=f"sampling {sched.describe()}")
    images = loaded.decode(result.images)  # a latent model's samples through its own decoder
    save_grid(images, out, ncol=max(1, round(n ** 0.5)))  # 100 -> 10 x 10: with --labels all, one digit per column
    if save_tensors:
        from ..io import save_safetensors

        save_safetensors(save_tensors, {"images": images, **({"latents": result.images} if loaded.is_latent else {})})
    costs = measure_step_costs(loaded.unet, guidance=conditioning is not None and conditioning.guided,
                               cross_attention_len=loaded.cross_attention_len)
    console.print(
        f"{n} samples, {sched.describe()}: {costs.schedule_macs(sched) / 1e6:,.1f} M MACs/image, "
        f"{1000 * result.seconds / n:.2f} ms/image -> {out}"
    )


@app.command()
@user_errors
def evaluate(
    model: Optional[Path] = ModelOpt,
    schedule: Optional[Path] = ScheduleOpt,
    sampler: Optional[str] = SamplerOpt,
    steps: Optional[int] = StepsOpt,
    deepcache: Optional[int] = DeepCacheOpt,
    branch: Optional[int] = BranchOpt,
    samples: int = typer.Option(1000, min=2, help="Samples to draw. On the default model FID's 95% interval is about ±33 at 1,000 and ±25 at 2,000; the paired difference to the teacher is several times narrower (docs/metrics.md)."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the initial noise (shared with the teacher)."),
    teacher_steps: int = typer.Option(100, min=1, help="The teacher is DDIM with this many steps, on the same noise."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="pytorch-fid Inception weights file: standard FID instead of the digits classifier."),
    real_data: Optional[Path] = typer.Option(None, "--real-data", help="Folder of real images (default: the digits)."),
    labels: Optional[str] = LabelsOpt,
    guidance: float = GuidanceOpt,
    prompt: Optional[list[str]] = PromptOpt,
    prompts: Optional[Path] = PromptsOpt,
    negative_prompt: Optional[str] = NegativeOpt,
    clip_model: Optional[Path] = typer.Option(None, "--clip-model", help="A local CLIP model folder (CLIPModel + CLIPProcessor, save_pretrained): also report the CLIP score of the prompts."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the metrics as JSON here."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Measure quality: against the teacher on the same noise (PSNR, SSIM, distance: any model), and FID/KID
    against real data (the digits, or --real-data)."""
    from ..anatomy import noise_shape
    from ..io import write_json
    from ..metrics import meter_for
    from ..metrics.paired import PixelMeter, paired_report
    from ..models import load_model
    from ..sampling import initial_noise, sample
    from ..schedule import Schedule

    set_threads(threads)
    placed = placement_from_options(device, dtype)
    check_schedule_options(schedule, sampler, steps, deepcache, branch)
    check_output_file(out, "--out")
    loaded = load_model(model, device=placed[0], dtype=placed[1])
    sched = resolve_schedule(schedule, sampler, steps, deepcache, branch, loaded)
    meter = meter_for(loaded, inception_weights, real_data)
    teacher = Schedule.teacher(loaded.scheduler_config, teacher_steps)
    noise = initial_noise(samples, noise_shape(loaded.unet), seed)
    texts = prompts_from_options(prompt, prompts)
    conditioning = conditioning_from_options(loaded, None, labels, guidance, samples, texts, negative_prompt)
    clip = None
    if clip_model is not None:
        if not texts:
            raise FlexdiffError("--clip-model scores images against their prompts: give --prompt or --prompts")
        from ..metrics.clip import load_clip

        clip = load_clip(clip_model)
    is_teacher = sched.steps == teacher.steps and sched.sampler == teacher.sampler
    if is_teacher and isinstance(meter, PixelMeter):
        raise FlexdiffError("this is the teacher's own schedule, and without real images (--real-data) quality is "
                            "measured against the teacher: give a faster schedule (--schedule, --steps, --deepcache)")
    with progress_bar() as progress:
        images = loaded.decode(sample(loaded.unet, loaded.scheduler_config, sched, noise, cond=conditioning,
                                      progress=progress, description=f"sampling {sched.describe()}").images)
        teacher_images = None if is_teacher else loaded.decode(sample(
            loaded.unet, loaded.scheduler_config, teacher, noise, cond=conditioning, progress=progress,
            description=f"teacher {teacher.describe()}").images)
    metrics = {}
    if not isinstance(meter, PixelMeter):
        metrics = meter.report(meter.features(images), None if is_teacher else meter.features(teacher_images))
    if teacher_images is not None:
        metrics.update(paired_report(images, teacher_images))
    if clip is not None:  # prompt i conditions sample i (cycled), as in the sampling
        from ..metrics.clip import clip_scores
        from ..metrics.paired import mean_interval

        rows = [texts[i % len(texts)] for i in range(samples)]
        ours = clip_scores(images, rows, clip)
        metrics["clip score"] = mean_interval(ours)
        if teacher_images is not None:
            metrics["clip score - teacher (paired)"] = mean_interval(ours - clip_scores(teacher_images, rows, clip))
    what = f"labels {labels}, guidance {guidance:g}" if labels else \
        (f"prompts, guidance {guidance:g}" if loaded.has_text else "unconditional")
    space = "teacher-relative only (no real images)" if isinstance(meter, PixelMeter) else \
        f"{meter.name} features (headline: {meter.headline}, lower is better)"
    console.print(f"{sched.describe()} on {samples} samples (seed {seed}, {what}), {space}, 95% intervals; "
                  "teacher PSNR and SSIM: higher is closer to the teacher:")
    for k, v in metrics.items():
        scale = 1e3 if k == "kid" else 1.0
        label = "kid x1e3" if k == "kid" else k
        console.print(f"  {label:18s} {v.value * scale:8.3f}  [{v.lo * scale:.3f}, {v.hi * scale:.3f}]", markup=False)
    if out:
        write_json(out, dict(schedule=sched.to_dict(), samples=samples, seed=seed, features=meter.name,
                             labels=labels, guidance=guidance, headline=meter.headline,
                             metrics={k: v.to_dict() for k, v in metrics.items()}))
