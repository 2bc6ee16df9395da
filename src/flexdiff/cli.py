"""The `flexdiff` command line: train | sample | evaluate | bench | search | intervals | experts."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .errors import FlexdiffError

app = typer.Typer(
    help="Sample pretrained diffusion models faster: step schedules (full / partial / null) "
    "on diffusers UNets, with honest quality and cost measurements.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """flexdiff: faster sampling for pretrained diffusion models."""

ModelOpt = typer.Option(
    None,
    "--model",
    help="A local diffusers UNet2DModel / UNet2DConditionModel folder or pipeline folder. "
    "Default: the digits UNet shipped with flexdiff.",
)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def user_errors(fn):
    """Turn a FlexdiffError into one red line and exit code 2 (no stack trace)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlexdiffError as e:
            console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except OSError as e:  # the machine said no (disk full, permissions): the user's to fix, not a bug
            where = f" {e.filename}" if e.filename else ""
            console.print(f"[red]error:[/red] cannot read or write{escape(where)}: {escape(e.strerror or str(e))}",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(2)

    return wrapper


def _file_target(path: Optional[Path], option: str) -> None:
    """Check a file the command will write, before any work; say so when it replaces one."""
    from .outputs import check_file_target

    if check_file_target(path, option):
        console.print(f"note: {option} {path} exists and will be replaced", highlight=False, markup=False)


def _threads(threads: Optional[int]) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise FlexdiffError(f"--threads {threads}: must be at least 1 (leave it out for torch's choice)")
        torch.set_num_threads(threads)


@app.command()
@user_errors
def train(
    out: Path = typer.Option(..., "--out", help="Folder for the trained model (diffusers layout) and its checkpoint."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of images to train on (an unconditional model). Default: scikit-learn's digits (train split, 16x16), class-conditional."),
    resolution: int = typer.Option(16, min=8, help="Image size for --data (square)."),
    steps: int = typer.Option(2400, min=1, help="Optimiser steps (with --lr-schedule constant, a finished run can be extended by raising it)."),
    batch_size: int = typer.Option(128, min=1),
    lr: float = typer.Option(1e-3, min=0.0),
    lr_schedule: str = typer.Option("cosine", "--lr-schedule", help="cosine (decay to 10% at --steps) or constant (after warm-up)."),
    warmup: int = typer.Option(200, min=1, help="Linear warm-up steps."),
    ema_decay: float = typer.Option(0.999, min=0.0, max=1.0),
    label_dropout: float = typer.Option(0.1, min=0.0, max=0.99, help="Share of labels replaced by the null label (class-conditional models)."),
    snapshot_every: int = typer.Option(0, min=0, help="Also save the EMA model every N steps under OUT/snapshots/ (0: never)."),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(250, min=1, help="Steps between checkpoints; a killed run resumes from the last one."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
):
    """Train a diffusion UNet (epsilon prediction, DDPM, EMA weights). Resumes if --out holds a checkpoint."""
    import time

    from .data import load_digits_split, load_image_folder
    from .models import DEFAULT_UNET_CONFIG, build_default_unet
    from .outputs import check_folder_target, run_folder
    from .train import TrainConfig
    from .train import train as run_train

    _threads(threads)
    check_folder_target(out)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay, seed=seed,
                      checkpoint_every=checkpoint_every, lr_schedule=lr_schedule, label_dropout=label_dropout,
                      snapshot_every=snapshot_every)
    labels = None
    if data is None:
        images, labels = load_digits_split("train")
        unet = build_default_unet(seed)
    else:
        halvings = len(DEFAULT_UNET_CONFIG["block_out_channels"]) - 1
        if resolution % 2 ** halvings:
            raise FlexdiffError(f"--resolution {resolution}: the UNet halves the image {halvings} times; give a "
                                f"multiple of {2 ** halvings}")
        images = load_image_folder(data, resolution)
        c = images.shape[1]
        unet = build_default_unet(seed, sample_size=resolution, in_channels=c, out_channels=c, num_class_embeds=None)
    t0 = time.perf_counter()
    with run_folder(out), progress_bar() as progress:
        summary = run_train(unet, images, out, cfg, progress=progress, labels=labels)
    console.print(
        f"trained {steps} steps on {images.shape[0]} images; final loss {summary['final_loss_last200']:.4f}; "
        f"this run {time.perf_counter() - t0:.0f} s, total {summary['wall_time_s']:.0f} s -> {out}"
    )


def _parse_ints(text: str, option: str, minimum: int = 1) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FlexdiffError(f"{option} {text!r}: expected comma-separated whole numbers, e.g. 5,10,20") from None
    if not values or any(v < minimum for v in values):
        raise FlexdiffError(f"{option} {text!r}: give one or more values, each >= {minimum}")
    return values


def _resolve_schedule(schedule: Optional[Path], sampler: str, steps: int,
                      deepcache: Optional[int], branch: int, loaded):
    """The schedule to run, checked against the model before any sampling."""
    from .schedule import SAMPLERS, Schedule

    if schedule is not None:
        sched = Schedule.load(schedule)
    elif sampler not in SAMPLERS:
        raise FlexdiffError(f"--sampler {sampler!r}: accepted values are {', '.join(SAMPLERS)}")
    elif deepcache:
        sched = Schedule.deepcache(sampler, steps, deepcache, branch)
    else:
        sched = Schedule.full(sampler, steps)
    _check_schedule(sched, loaded, f"--schedule {schedule}" if schedule is not None else "")
    return sched


def _check_schedule(sched, loaded, where: str) -> None:
    """Does `sched` run on this model (branches, timesteps)? The message names the file it came from."""
    from .engine import num_branches

    try:
        sched.check_fits(num_branches(loaded.unet),
                         num_train_timesteps=int(loaded.scheduler_config.get("num_train_timesteps", 1000)))
    except FlexdiffError as e:
        raise FlexdiffError(f"{where}: {e}" if where else str(e)) from None


def _load_cond(path: Optional[Path], guidance: float, model):
    """Conditioning for a UNet2DConditionModel from a safetensors file."""
    if not model.is_conditional:
        if path is not None:
            raise FlexdiffError("--cond is only for conditional UNets (UNet2DConditionModel)")
        return None
    if path is None:
        raise FlexdiffError(
            "this model is a UNet2DConditionModel: pass --cond FILE.safetensors with tensors "
            "'encoder_hidden_states' (1 or N, seq, dim) and optionally 'negative'"
        )
    from safetensors.torch import load_file

    from .sampling import Conditioning

    if not path.is_file():
        raise FlexdiffError(f"--cond {path}: no such file")
    try:
        tensors = load_file(path)
    except Exception as e:
        raise FlexdiffError(f"--cond {path}: not a readable safetensors file ({e})") from None
    if "encoder_hidden_states" not in tensors:
        raise FlexdiffError(f"--cond {path}: missing tensor 'encoder_hidden_states' (found {sorted(tensors)})")
    return Conditioning(tensors["encoder_hidden_states"], tensors.get("negative"), guidance)


LabelsOpt = typer.Option(None, "--labels", help="Class-conditional models (the default): 'all' (each class in turn) or class indices, e.g. 3 or 0,1,7, cycled over the samples. Default: unconditional (the null label).")
GuidanceOpt = typer.Option(1.0, "--guidance", help="Classifier-free guidance scale (with --labels, or --cond for text UNets); 1 = none.")


def _conditioning(loaded, cond: Optional[Path], labels: Optional[str], guidance: float, n: int):
    """Text conditioning from --cond, or class labels from --labels; None for an unconditional model."""
    from .sampling import class_conditioning, num_classes, parse_labels

    classes = num_classes(loaded.unet)
    if labels is not None and classes is None:
        raise FlexdiffError(f"--labels: the model at {loaded.path} has no class labels (it is not a UNet2DModel "
                            "with num_class_embeds)")
    if classes is not None:
        if cond is not None:
            raise FlexdiffError("--cond is only for conditional UNets (UNet2DConditionModel); this model takes --labels")
        return class_conditioning(loaded.unet, parse_labels(labels, classes) if labels else (), n, guidance)
    if guidance != 1.0 and not loaded.is_conditional:
        raise FlexdiffError("--guidance needs a conditional model (--cond for a UNet2DConditionModel, --labels for "
                            "a class-conditional UNet2DModel)")
    return _load_cond(cond, guidance, loaded)


def _labels_tuple(loaded, labels: Optional[str], guidance: float) -> tuple[int, ...]:
    """--labels as a tuple for configs (searches, bench), checked against the model now, before any work."""
    _conditioning(loaded, None, labels, guidance, 1)
    from .sampling import num_classes, parse_labels

    return parse_labels(labels, num_classes(loaded.unet)) if labels else ()


SamplerOpt = typer.Option("ddim", "--sampler", help="ddim | dpmsolver++ | euler (ignored with --schedule).")
StepsOpt = typer.Option(100, "--steps", min=1, help="Sampler steps (ignored with --schedule).")
ScheduleOpt = typer.Option(None, "--schedule", help="A schedule JSON (full / partial:<branch> / null per step).")
DeepCacheOpt = typer.Option(None, "--deepcache", min=1, help="DeepCache uniform 1:N: a full step every N steps, partial between.")
BranchOpt = typer.Option(0, "--branch", min=0, help="Cache branch of partial steps for --deepcache (0 = cheapest).")


@app.command("sample")
@user_errors
def sample_cmd(
    out: Path = typer.Option(Path("samples.png"), "--out", help="PNG grid to write."),
    model: Optional[Path] = ModelOpt,
    schedule: Optional[Path] = ScheduleOpt,
    sampler: str = SamplerOpt,
    steps: int = StepsOpt,
    deepcache: Optional[int] = DeepCacheOpt,
    branch: int = BranchOpt,
    n: int = typer.Option(64, "--n", min=1, help="Number of images."),
    seed: int = typer.Option(0, help="Seed of the initial noise."),
    cond: Optional[Path] = typer.Option(None, "--cond", help="Conditional UNets: safetensors with 'encoder_hidden_states' [and 'negative']."),
    labels: Optional[str] = LabelsOpt,
    guidance: float = GuidanceOpt,
    save_tensors: Optional[Path] = typer.Option(None, "--save-tensors", help="Also save the raw samples (safetensors)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Draw samples with a schedule (or a plain sampler) and write a PNG grid."""
    from .cost import measure_step_costs
    from .grids import save_grid
    from .models import load_model
    from .sampling import initial_noise, sample

    _threads(threads)
    _file_target(out, "--out")
    if out.suffix.lower() != ".png":
        raise FlexdiffError(f"--out {out}: the sample grid is a PNG; give a name ending in .png")
    _file_target(save_tensors, "--save-tensors")
    loaded = load_model(model)
    sched = _resolve_schedule(schedule, sampler, steps, deepcache, branch, loaded)
    conditioning = _conditioning(loaded, cond, labels, guidance, n)
    c = loaded.unet.config
    noise = initial_noise(n, (c.in_channels, c.sample_size, c.sample_size), seed)
    with progress_bar() as progress:
        result = sample(loaded.unet, loaded.scheduler_config, sched, noise, cond=conditioning,
                        progress=progress, description=f"sampling {sched.describe()}")
    save_grid(result.images, out, ncol=max(1, round(n ** 0.5)))  # 100 -> 10 x 10: with --labels all, one digit per column
    if save_tensors:
        from .io import save_safetensors

        save_safetensors(save_tensors, {"images": result.images})
    costs = measure_step_costs(loaded.unet, guidance=conditioning is not None and conditioning.guided)
    console.print(
        f"{n} samples, {sched.describe()}: {costs.schedule_macs(sched) / 1e6:,.1f} M MACs/image, "
        f"{1000 * result.seconds / n:.2f} ms/image -> {out}"
    )


@app.command()
@user_errors
def evaluate(
    model: Optional[Path] = ModelOpt,
    schedule: Optional[Path] = ScheduleOpt,
    sampler: str = SamplerOpt,
    steps: int = StepsOpt,
    deepcache: Optional[int] = DeepCacheOpt,
    branch: int = BranchOpt,
    samples: int = typer.Option(1000, min=2, help="Samples to draw. On the default model FID's 95% interval is about ±33 at 1,000 and ±25 at 2,000; the paired difference to the teacher is several times narrower (docs/metrics.md)."),
    seed: int = typer.Option(0, help="Seed of the initial noise (shared with the teacher)."),
    teacher_steps: int = typer.Option(100, min=1, help="The teacher is DDIM with this many steps, on the same noise."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="pytorch-fid Inception weights file: standard FID instead of the digits classifier."),
    real_data: Optional[Path] = typer.Option(None, "--real-data", help="Folder of real images (default: the digits)."),
    labels: Optional[str] = LabelsOpt,
    guidance: float = GuidanceOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Write the metrics as JSON here."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Measure quality: FID and KID against real data, and rFID / paired FID difference / distance to the teacher."""
    from .io import write_json
    from .metrics import QualityMeter
    from .models import load_model
    from .sampling import initial_noise, sample
    from .schedule import Schedule

    _threads(threads)
    _file_target(out, "--out")
    loaded = load_model(model)
    sched = _resolve_schedule(schedule, sampler, steps, deepcache, branch, loaded)
    c = loaded.unet.config
    meter = QualityMeter.for_loaded(loaded, inception_weights, real_data)
    teacher = Schedule.full("ddim", teacher_steps)
    noise = initial_noise(samples, (c.in_channels, c.sample_size, c.sample_size), seed)
    conditioning = _conditioning(loaded, None, labels, guidance, samples)
    with progress_bar() as progress:
        res = sample(loaded.unet, loaded.scheduler_config, sched, noise, cond=conditioning, progress=progress,
                     description=f"sampling {sched.describe()}")
        teacher_feats = None
        if sched.steps != teacher.steps or sched.sampler != teacher.sampler:
            t_res = sample(loaded.unet, loaded.scheduler_config, teacher, noise, cond=conditioning, progress=progress,
                           description=f"teacher {teacher.describe()}")
            teacher_feats = meter.features(t_res.images)
    metrics = meter.report(meter.features(res.images), teacher_feats)
    what = f"labels {labels}, guidance {guidance:g}" if labels else "unconditional"
    console.print(f"{sched.describe()} on {samples} samples (seed {seed}, {what}), {meter.name} features, "
                  f"95% intervals (headline: {meter.headline}, lower is better):")
    for k, v in metrics.items():
        scale = 1e3 if k == "kid" else 1.0
        label = "kid x1e3" if k == "kid" else k
        console.print(f"  {label:18s} {v.value * scale:8.3f}  [{v.lo * scale:.3f}, {v.hi * scale:.3f}]")
    if out:
        write_json(out, dict(schedule=sched.to_dict(), samples=samples, seed=seed, features=meter.name,
                             labels=labels, guidance=guidance, headline=meter.headline,
                             metrics={k: v.to_dict() for k, v in metrics.items()}))


@app.command()
@user_errors
def bench(
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Folder for bench.md, bench.json, bench.png, samples.png (and a resumable cache)."),
    model: Optional[Path] = ModelOpt,
    preset: str = typer.Option("quick", help="quick (a few minutes: the README's main job) or full (the docs' table)."),
    samples: Optional[int] = typer.Option(None, min=2, help="Override the preset's samples per method."),
    seed: int = typer.Option(0, help="Seed of the shared initial noise."),
    teacher_steps: Optional[int] = typer.Option(None, min=1, help="Teacher DDIM steps (preset: 100)."),
    ddim_steps: Optional[str] = typer.Option(None, help="DDIM step counts, e.g. 5,10,20,50."),
    dpm_steps: Optional[str] = typer.Option(None, help="DPM-Solver++ step counts, e.g. 5,10,20."),
    deepcache: Optional[str] = typer.Option(None, help="DeepCache intervals N (uniform 1:N), e.g. 2,3,5."),
    deepcache_branches: Optional[str] = typer.Option(None, help="DeepCache branches, e.g. 0,2."),
    schedule: list[Path] = typer.Option([], "--schedule", help="Extra schedule JSON files to include (repeatable)."),
    search_budgets: Optional[str] = typer.Option(None, help="Run Flexiffusion (and AutoDiffusion-style) searches at these budgets (fractions of the teacher's MACs, e.g. 0.1,0.0625), or 'none'."),
    search_generations: Optional[int] = typer.Option(None, min=0, help="Generations of each search (preset: 6 quick, 10 full)."),
    search_population: Optional[int] = typer.Option(None, min=2, help="Population of each search."),
    search_eval_samples: Optional[int] = typer.Option(None, min=8, help="Evaluation samples per candidate in the searches."),
    autodiffusion: Optional[bool] = typer.Option(None, "--autodiffusion/--no-autodiffusion", help="Also run the AutoDiffusion-style peer search."),
    mixture: list[Path] = typer.Option([], "--mixture", help="Mixture-of-experts folders to include (repeatable); 'default' is the shipped one."),
    expert_budgets: Optional[str] = typer.Option(None, help="Build mixtures of experts at these budgets (fractions of the teacher's MACs, e.g. 0.5,0.4) with their baselines, or 'none'."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Standard FID with pytorch-fid weights from this file."),
    real_data: Optional[Path] = typer.Option(None, "--real-data", help="Folder of real images (default: the digits)."),
    labels: Optional[str] = LabelsOpt,
    guidance: float = GuidanceOpt,
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Run the teacher and the peers side by side on the same noise; write a table, a plot and sample grids."""
    import dataclasses

    from .bench import PRESETS, run_bench
    from .metrics import QualityMeter
    from .models import load_model
    from .outputs import check_folder_target, run_folder
    from .schedule import Schedule

    _threads(threads)
    if preset not in PRESETS:
        raise FlexdiffError(f"--preset {preset!r}: accepted values are {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    overrides = dict(
        samples=samples, teacher_steps=teacher_steps,
        ddim_steps=ddim_steps and _parse_ints(ddim_steps, "--ddim-steps"),
        dpm_steps=dpm_steps and _parse_ints(dpm_steps, "--dpm-steps"),
        deepcache_intervals=deepcache and _parse_ints(deepcache, "--deepcache"),
        deepcache_branches=deepcache_branches and _parse_ints(deepcache_branches, "--deepcache-branches", minimum=0),
        search_budgets=() if search_budgets == "none" else _float_list(search_budgets, "--search-budgets"),
        search_generations=search_generations, search_population=search_population,
        search_eval_samples=search_eval_samples, autodiffusion=autodiffusion,
    )
    if any(not 0 < b <= 1 for b in overrides["search_budgets"] or ()):
        raise FlexdiffError(f"--search-budgets {search_budgets!r}: each must be a fraction in (0, 1]")
    overrides["expert_budgets"] = () if expert_budgets == "none" else _float_list(expert_budgets, "--expert-budgets")
    if any(not 0 < b <= 1 for b in overrides["expert_budgets"] or ()):
        raise FlexdiffError(f"--expert-budgets {expert_budgets!r}: each must be a fraction in (0, 1]")
    if mixture:
        overrides["mixtures"] = tuple(str(p) for p in mixture)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    check_folder_target(out)
    loaded = load_model(model)
    extra = tuple(Schedule.load(p) for p in schedule)
    for path, sched in zip(schedule, extra):  # named by file, before hours of searches and sampling
        _check_schedule(sched, loaded, f"--schedule {path}")
    for path in mixture:
        if str(path) != "default":
            load_model(path)  # a broken mixture folder is refused now, not after the searches
    cfg = dataclasses.replace(cfg, labels=_labels_tuple(loaded, labels, guidance), guidance=guidance)
    meter = QualityMeter.for_loaded(loaded, inception_weights, real_data)
    with run_folder(out), progress_bar() as progress:
        result = run_bench(loaded, cfg, out, meter, extra, progress=progress)
    from .bench import markdown_table

    console.print(markdown_table(result), highlight=False, soft_wrap=True, markup=False)
    console.print(f"wrote {out}/bench.md, bench.json, bench.png, samples.png")


def _float_list(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FlexdiffError(f"{option} {text!r}: expected comma-separated numbers, e.g. 0.0625,0.1") from None


@app.command()
@user_errors
def search(
    out: Path = typer.Option(Path("runs/search"), "--out", help="Folder for best.json, history.json, search.png (and front.json); holds the resumable state."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Max MACs per image as a fraction of the teacher's (DDIM-100), e.g. 0.0625."),
    speedup: Optional[float] = typer.Option(None, "--speedup", help="Or: the minimum speed-up in MACs (budget = 1/speedup)."),
    pareto: bool = typer.Option(False, "--pareto", help="Multi-objective (fitness vs MACs, NSGA-II): return the whole front (budget optional)."),
    space: str = typer.Option("segment", "--space", help="segment (Flexiffusion) or stepwise (AutoDiffusion-style: timesteps and per-step layer skipping)."),
    model: Optional[Path] = ModelOpt,
    sampler: str = typer.Option("dpmsolver++", "--sampler", help="Base sampler of the schedules (segment space: ddim | dpmsolver++ | euler)."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Choices of the step count T, e.g. 10,15,20,25 (stepwise: 6,8,10,12)."),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="Choices of the segment length L, e.g. 1,2,3,4,5."),
    branches: Optional[str] = typer.Option(None, "--branches", help="Branches partial steps may use (default: all of the model's)."),
    ends: Optional[str] = typer.Option(None, "--ends", help="Segment space: choices of the last timestep, steps spread evenly from the noisiest down to it; 0 = the sampler's own spacing (default 0,100,200,300)."),
    population: int = typer.Option(16, min=2),
    generations: int = typer.Option(10, min=0),
    eval_samples: int = typer.Option(256, min=8, help="Samples per candidate, on fixed evaluation noise."),
    metric: str = typer.Option("distance", "--metric", help="Fitness: distance (per-sample, to the teacher), rfid (FID to the teacher's samples) or fid (quality vs real data: FID, or on the digits the class-balanced distance)."),
    seed: int = typer.Option(0, help="Seed of the search and of the evaluation noise."),
    labels: Optional[str] = LabelsOpt,
    guidance: float = GuidanceOpt,
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Search a schedule of full / partial / null steps that stays closest to the teacher under a MACs budget."""
    from .engine import num_branches as count_branches
    from .metrics import QualityMeter
    from .models import load_model
    from .outputs import check_folder_target, run_folder
    from .schedule import SAMPLERS
    from .search import SearchConfig, SegmentSpace, StepwiseSpace, search_from_settings

    _threads(threads)
    check_folder_target(out)
    if budget is not None and speedup is not None:
        raise FlexdiffError("give either --budget or --speedup, not both")
    if speedup is not None:
        if speedup <= 1:
            raise FlexdiffError(f"--speedup {speedup}: must be > 1")
        budget = 1 / speedup
    if sampler not in SAMPLERS:
        raise FlexdiffError(f"--sampler {sampler!r}: accepted values are {', '.join(SAMPLERS)}")
    loaded = load_model(model)
    num_branches = count_branches(loaded.unet)
    kw = dict(num_train_timesteps=loaded.scheduler_config.get("num_train_timesteps", 1000))
    if steps:
        kw["step_choices"] = _parse_ints(steps, "--steps")
    kw["branches"] = _parse_ints(branches, "--branches", minimum=0) if branches else tuple(range(num_branches))
    if space == "segment":
        if lengths:
            kw["length_choices"] = _parse_ints(lengths, "--lengths")
        if ends:
            kw["end_choices"] = _parse_ints(ends, "--ends", minimum=0)
        sp = SegmentSpace(sampler=sampler, **kw)
    elif space == "stepwise":
        if sampler == "ddim":
            raise FlexdiffError("--space stepwise picks its own timesteps: use --sampler dpmsolver++ or euler")
        sp = StepwiseSpace(sampler=sampler, **kw)
    else:
        raise FlexdiffError(f"--space {space!r}: accepted values are segment, stepwise")
    cfg = SearchConfig(budget=budget, pareto=pareto, population=population, generations=generations,
                       eval_samples=eval_samples, metric=metric, seed=seed,
                       labels=_labels_tuple(loaded, labels, guidance), guidance=guidance)
    meter = QualityMeter.for_loaded(loaded)
    with run_folder(out), progress_bar() as progress:
        s = search_from_settings(loaded, meter, sp, cfg, out, progress=progress)
        result = s.run()
    b = result.best
    console.print(
        f"best: {b.describe()}  {metric} {b.meta['fitness']:.3f}  {b.meta['macs_per_image'] / 1e6:,.1f} M MACs/image "
        f"({b.meta['speedup_macs']:.2f}x fewer than the teacher)  search took {result.seconds:.0f} s, "
        f"{len(result.evaluated)} candidates scored -> {out}/best.json"
    )
    for f in result.front:
        console.print(f"  front: {f.describe()}  {metric} {f.meta['fitness']:.3f}  {f.meta['speedup_macs']:.2f}x")
    man = getattr(loaded.unet, "manifest", None)
    if man:  # searching over a mixture: its own DDIM run is the teacher; say what that means for the original
        teacher_steps = cfg.teacher_steps
        original = man["teacher_macs_per_call"] * teacher_steps
        console.print(f"(the teacher here is the mixture itself with DDIM-{teacher_steps}; against the original "
                      f"model's DDIM-{teacher_steps} this schedule is {original / b.meta['macs_per_image']:.1f}x cheaper)",
                      markup=False, highlight=False)


@app.command("proxy-study")
@user_errors
def proxy_study_cmd(
    out: Path = typer.Option(Path("runs/proxy"), "--out"),
    model: Optional[Path] = ModelOpt,
    candidates: int = typer.Option(24, min=3, help="Schedules spread over the search space."),
    eval_samples: int = typer.Option(256, min=8, help="Samples for the proxies (as in the search)."),
    fid_samples: int = typer.Option(1000, min=8, help="Samples for the real FID of each candidate."),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """How well do rFID and the per-sample distance rank candidates against the real FID (Spearman), and how much faster are they?"""
    from .metrics import QualityMeter
    from .models import load_model
    from .outputs import check_folder_target, run_folder
    from .search.proxy import proxy_study, proxy_table

    _threads(threads)
    check_folder_target(out)
    loaded = load_model(model)
    meter = QualityMeter.for_loaded(loaded)
    with run_folder(out), progress_bar() as progress:
        res = proxy_study(loaded, meter, out, candidates, eval_samples, fid_samples, seed, progress=progress)
    console.print(proxy_table(res), highlight=False, soft_wrap=True, markup=False)


@app.command("metric-study")
@user_errors
def metric_study_cmd(
    out: Path = typer.Option(Path("runs/metric-study"), "--out", help="Folder for study.md, study.json, study.png."),
    model: Optional[Path] = ModelOpt,
    samples: int = typer.Option(1000, min=10, help="Model samples per DDIM level (same noise for every level)."),
    main_samples: int = typer.Option(500, min=10, help="The main job's sample count, for check (c)."),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Does the quality metric rank? Floor, noise / blur / DDIM-steps responses and resolution (docs/metrics.md)."""
    from .metrics import QualityMeter
    from .metrics.study import run_study, study_table
    from .models import load_model
    from .outputs import check_folder_target, run_folder

    _threads(threads)
    check_folder_target(out)
    loaded = load_model(model)
    meter = QualityMeter.for_loaded(loaded)
    with run_folder(out), progress_bar() as progress:
        res = run_study(loaded, meter, out, samples, main_samples, seed, progress=progress)
    console.print(study_table(res), highlight=False, soft_wrap=True, markup=False)
    console.print(f"wrote {out}/study.md, study.json, study.png", markup=False)


@app.command("train-classifier")
@user_errors
def train_classifier_cmd(
    out: Path = typer.Option(..., "--out", help="Folder for model.safetensors and config.json."),
    epochs: int = typer.Option(30, min=1),
    seed: int = typer.Option(0),
):
    """Train the digits classifier whose features define the default FID space (shipped in the package)."""
    from .metrics.classifier import train_classifier
    from .outputs import run_folder

    with run_folder(out), progress_bar() as progress:
        info = train_classifier(out, epochs=epochs, seed=seed, progress=progress)
    console.print(f"test accuracy {info['test_accuracy']:.4f} on {info['test_images']} images -> {out}")


def _training_images(data: Optional[Path], loaded):
    if data is None:
        return None  # the pipeline uses the digits for the default model, and refuses other models
    from .data import load_image_folder

    c = loaded.unet.config
    images = load_image_folder(data, c.sample_size, c.in_channels)
    return images


@app.command("intervals")
@user_errors
def intervals_cmd(
    out: Path = typer.Option(..., "--out", help="Folder for intervals.json, similarity.png and similarity.npz."),
    model: Optional[Path] = ModelOpt,
    data: Optional[Path] = typer.Option(None, "--data", help="Images the model was trained on (default: the digits, for the default model)."),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="Number of intervals. Default: the knee of the within-interval cost curve."),
    k_max: int = typer.Option(5, "--k-max", min=1, help="Largest K the knee rule considers."),
    measure: str = typer.Option("mean", help="Similarity to cluster: grad (loss-gradient cosine), cka (activation CKA) or mean."),
    timesteps: int = typer.Option(20, "--timesteps", min=2, help="Timesteps sampled evenly over the training range."),
    images: int = typer.Option(128, "--images", min=2, help="Images (with one fixed noise) per timestep."),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Timestep similarity (gradient cosine and activation CKA), heat map, and contiguous intervals."""
    import torch

    from .engine import is_mixture
    from .experts.intervals import MEASURES, find_intervals
    from .experts.pipeline import training_images
    from .models import load_model
    from .outputs import check_folder_target, run_folder

    _threads(threads)
    check_folder_target(out)
    if measure not in MEASURES:
        raise FlexdiffError(f"--measure {measure!r}; accepted: {', '.join(MEASURES)}")
    if k is not None and k > timesteps:
        raise FlexdiffError(f"--k {k}: choose 1 to {timesteps} intervals (the number of sampled timesteps)")
    loaded = load_model(model)
    if is_mixture(loaded.unet):
        raise FlexdiffError(f"--model {loaded.path} is a mixture; give the teacher UNet")
    imgs = training_images(loaded, _training_images(data, loaded))
    g = torch.Generator().manual_seed(seed)
    imgs = imgs[torch.randperm(len(imgs), generator=g)[:images]]
    with run_folder(out), progress_bar() as progress:
        iv = find_intervals(loaded.unet, imgs, loaded.scheduler_config, out, timesteps, measure, k, k_max, seed,
                            progress)
    console.print(f"{iv.k} intervals ({iv.meta['k_rule']}): " + ", ".join(f"[{a}, {b}]" for a, b in iv.bounds())
                  + f" -> {out / 'intervals.json'}, {out / 'similarity.png'}", markup=False, highlight=False)


@app.command("experts")
@user_errors
def experts_cmd(
    out: Path = typer.Option(..., "--out", help="Pipeline folder: every stage writes (and resumes) under it."),
    model: Optional[Path] = ModelOpt,
    data: Optional[Path] = typer.Option(None, "--data", help="Training images (default: the digits, for the default model)."),
    budget: float = typer.Option(0.5, help="MACs of the whole sampling run, as a fraction of the teacher's."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Run only up to this stage: intervals, elastic, agent or final (each resumes)."),
    sampler: str = typer.Option("ddim", help="The sampling run the budget is counted on."),
    steps: int = typer.Option(100, "--steps", min=1, help="Steps of that sampling run."),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="Number of intervals (default: knee rule)."),
    elastic_steps: int = typer.Option(200, min=1, help="Sandwich-rule steps per elastic expert."),
    agent_steps: int = typer.Option(150, min=1, help="Routing agent steps."),
    final_steps: int = typer.Option(400, min=1, help="Fine-tuning steps per extracted expert."),
    batch_size: int = typer.Option(64, min=1),
    seed: int = typer.Option(0),
    baselines: bool = typer.Option(False, "--baselines", help="Also build the Diff-Pruning single model and the uniform-width experts at the same MACs."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Prune the model into a mixture of interval experts (DiffPruning) under a MACs budget.

    Stages: intervals -> elastic fine-tuning -> routing agent -> extraction + final fine-tuning.
    The result, OUT/budget-B/mixture, works as --model for sample, evaluate, search and bench.
    """
    import time

    from .experts.pipeline import STAGES, ExpertsConfig, ExpertsPipeline
    from .models import load_model
    from .outputs import check_folder_target, run_folder

    _threads(threads)
    check_folder_target(out)
    if stage is not None and stage not in STAGES:
        raise FlexdiffError(f"--stage {stage!r}; accepted: {', '.join(STAGES)}")
    cfg = ExpertsConfig(budget=budget, sampler=sampler, num_steps=steps, k=k, elastic_steps=elastic_steps,
                        agent_steps=agent_steps, final_steps=final_steps, batch_size=batch_size, seed=seed)
    cfg.validate()
    loaded = load_model(model)
    images = _training_images(data, loaded)
    t0 = time.perf_counter()
    with run_folder(out), progress_bar() as progress:
        pipe = ExpertsPipeline(loaded, out, cfg, images, progress)
        stages = STAGES if stage is None else STAGES[:STAGES.index(stage) + 1]
        result = pipe.run(stages)
        if baselines and result is not None:
            pipe.uniform_experts()
            pipe.pruned_baseline()
    took = time.perf_counter() - t0
    if result is None:
        console.print(f"stage {stage} done in {took:.0f} s -> {out}", markup=False, highlight=False)
        return
    import json

    man = json.loads((result / "mixture.json").read_text())
    lines = [f"mixture at {man['fraction_of_teacher']:.3f} of the teacher's MACs ({man['sampler']}-{man['num_steps']}), "
             f"built in {took:.0f} s -> {result}"]
    for e, calls, served in zip(man["experts"], man["macs_per_call"], man["steps_served"]):
        lines.append(f"  expert t in [{e['interval'][0]}, {e['interval'][1]}]: widths {e['spec']['widths']}, "
                     f"depths {e['spec']['depths']}, {calls / man['teacher_macs_per_call']:.2f} of the teacher per call, "
                     f"{served} steps")
    console.print("\n".join(lines), markup=False, highlight=False)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
