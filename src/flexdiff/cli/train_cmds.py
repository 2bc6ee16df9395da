"""flexdiff train | train-classifier | metric-study: the shipped model, its classifier, the metric's study."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import FlexdiffError
from .app import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    app,
    console,
    placement_from_options,
    progress_bar,
    set_threads,
    user_errors,
)


@app.command()
@user_errors
def train(
    out: Path = typer.Option(..., "--out", help="Folder for the trained model (diffusers layout) and its checkpoint."),
    arch: str = typer.Option("unet", "--arch", help="unet (the default UNet: DDPM, epsilon) or transformer (the default transformer: SD3-shaped, flow matching; digits only)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of images to train on (an unconditional model). Default: scikit-learn's digits (train split, 16x16), class-conditional."),
    resolution: int = typer.Option(16, min=8, help="Image size for --data (square)."),
    steps: int = typer.Option(2400, min=1, help="Optimiser steps (with --lr-schedule constant, a finished run can be extended by raising it)."),
    batch_size: int = typer.Option(128, min=1),
    lr: float = typer.Option(1e-3, help="Peak learning rate (a finite number above 0)."),
    lr_schedule: str = typer.Option("cosine", "--lr-schedule", help="cosine (decay to 10% at --steps) or constant (after warm-up)."),
    warmup: int = typer.Option(200, min=1, help="Linear warm-up steps."),
    ema_decay: float = typer.Option(0.999, min=0.0, max=1.0),
    label_dropout: float = typer.Option(0.1, min=0.0, max=0.99, help="Share of labels replaced by the null label (class-conditional models)."),
    snapshot_every: int = typer.Option(0, min=0, help="Also save the EMA model every N steps under OUT/snapshots/ (0: never)."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1),
    checkpoint_every: int = typer.Option(250, min=1, help="Steps between checkpoints; a killed run resumes from the last one."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start from this model's weights instead of a fresh initialisation (a model folder of the same --arch and shape, or default / default-transformer): more training for a shipped model whose checkpoint is gone. The optimiser starts afresh (with --warmup); with --snapshot-every the start is saved as snapshot step 0."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    device: str = DeviceOpt,
    dtype: str = typer.Option("float32", "--dtype", help="float32, or bfloat16 (autocast with float32 master weights; auto picks it on a GPU that has it). float16 is refused: it needs loss scaling."),
):
    """Train the default UNet (epsilon, DDPM) or transformer (flow matching), EMA weights. Resumes if --out holds a checkpoint."""
    import time

    from ..data import load_digits_split, load_image_folder
    from ..models import DEFAULT_LABEL_TOKENS, DEFAULT_UNET_CONFIG, build_default_transformer, build_default_unet
    from ..outputs import check_folder_target, run_folder
    from ..samplers import FLOW_SCHEDULER_CONFIG
    from ..train import TrainConfig
    from ..train import train as run_train

    if arch not in ("unet", "transformer"):
        raise FlexdiffError(f"--arch {arch!r}: accepted values are unet, transformer")
    if arch == "transformer" and data is not None:
        raise FlexdiffError("--arch transformer trains the class-conditional default on the digits; --data (an "
                            "unconditional image folder) works with --arch unet only")
    set_threads(threads)
    from ..devices import training_dtype

    placed = placement_from_options(device, dtype)
    training_dtype(placed[1])
    check_folder_target(out)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay, seed=seed,
                      checkpoint_every=checkpoint_every, lr_schedule=lr_schedule, label_dropout=label_dropout,
                      snapshot_every=snapshot_every)
    labels, tokens, sched = None, None, None
    if arch == "transformer":
        images, labels = load_digits_split("train")
        unet, tokens, sched = build_default_transformer(seed), DEFAULT_LABEL_TOKENS, FLOW_SCHEDULER_CONFIG
    elif data is None:
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
    if init_from is not None:
        from dataclasses import replace

        from ..fingerprints import weights_fingerprint

        start_weights(unet, init_from)
        cfg = replace(cfg, init_from=weights_fingerprint(unet))
    t0 = time.perf_counter()
    with run_folder(out), progress_bar() as progress:
        summary = run_train(unet, images, out, cfg, scheduler_config=sched, progress=progress, labels=labels,
                            device=placed[0], dtype=placed[1], tokens=tokens)
    console.print(
        f"trained {steps} steps on {images.shape[0]} images; final loss {summary['final_loss_last200']:.4f}; "
        f"this run {time.perf_counter() - t0:.0f} s, total {summary['wall_time_s']:.0f} s -> {out}"
    )


def start_weights(model, source: str) -> None:
    """Load `source`'s weights into `model` (the freshly built one of the same --arch), refusing a folder whose model
    is of another class or shape, before anything is written."""
    from ..models import load_model

    other = load_model(Path(source), "--init-from").unet
    mine, theirs = model.state_dict(), other.state_dict()
    if type(other) is not type(model) or mine.keys() != theirs.keys() or \
            any(mine[k].shape != theirs[k].shape for k in mine):
        what = "of another shape" if type(other) is type(model) else "not"
        raise FlexdiffError(f"--init-from {source}: a {type(other).__name__}, {what} the {type(model).__name__} this "
                            "--arch trains; give a folder this command trained (or default with --arch unet, "
                            "default-transformer with --arch transformer)")
    model.load_state_dict({k: v.float() for k, v in theirs.items()})


@app.command("train-classifier")
@user_errors
def train_classifier_cmd(
    out: Path = typer.Option(..., "--out", help="Folder for model.safetensors and config.json."),
    epochs: int = typer.Option(30, min=1),
    seed: int = typer.Option(0, min=0, max=2**32 - 1),
):
    """Train the digits classifier whose features define the default FID space (shipped in the package)."""
    from ..metrics.classifier import train_classifier
    from ..outputs import run_folder

    with run_folder(out), progress_bar() as progress:
        info = train_classifier(out, epochs=epochs, seed=seed, progress=progress)
    console.print(f"test accuracy {info['test_accuracy']:.4f} on {info['test_images']} images -> {out}")


@app.command("metric-study")
@user_errors
def metric_study_cmd(
    out: Path = typer.Option(Path("runs/metric-study"), "--out", help="Folder for study.md, study.json, study.png."),
    model: Optional[Path] = ModelOpt,
    samples: int = typer.Option(1000, min=10, help="Model samples per DDIM level (same noise for every level)."),
    main_samples: int = typer.Option(500, min=10, help="The main job's sample count, for check (c)."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Does the quality metric rank? Floor, noise / blur / DDIM-steps responses and resolution (docs/metrics.md)."""
    from ..metrics import QualityMeter
    from ..metrics.study import run_study, study_table
    from ..models import load_model
    from ..outputs import check_folder_target, run_folder

    set_threads(threads)
    placed = placement_from_options(device, dtype)
    check_folder_target(out)
    loaded = load_model(model, device=placed[0], dtype=placed[1])
    meter = QualityMeter.for_loaded(loaded)
    with run_folder(out), progress_bar() as progress:
        res = run_study(loaded, meter, out, samples, main_samples, seed, progress=progress)
    console.print(study_table(res), highlight=False, soft_wrap=True, markup=False)
    console.print(f"wrote {out}/study.md, study.json, study.png", markup=False)
