"""flexdiff intervals | experts: timestep intervals and the mixture of experts (DiffPruning)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import FlexdiffError
from .app import (
    GpusOpt,
    ModelOpt,
    RayAddressOpt,
    WorkersOpt,
    app,
    console,
    progress_bar,
    set_threads,
    training_images_from_option,
    user_errors,
    workers_from_options,
)


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
    seed: int = typer.Option(0, min=0, max=2**32 - 1),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Timestep similarity (gradient cosine and activation CKA), heat map, and contiguous intervals."""
    from ..experts.intervals import find_intervals, similarity_images
    from ..experts.pipeline import training_images
    from ..mixture import is_mixture
    from ..models import load_model
    from ..outputs import check_folder_target, run_folder

    set_threads(threads)
    check_folder_target(out)
    loaded = load_model(model)
    if is_mixture(loaded.unet):
        raise FlexdiffError(f"--model {loaded.path} is a mixture; give the teacher UNet")
    imgs = training_images(loaded, training_images_from_option(data, loaded))
    imgs = similarity_images(imgs, images, seed)
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
    budget: float = typer.Option(0.5, help="Cost of the whole sampling run, as a fraction of the teacher's (see --budget-kind)."),
    budget_kind: str = typer.Option("macs", "--budget-kind", help="What the budget counts: macs, or latency (each sub-network's forward timed once on this machine at --latency-batch; the wall-clock follows the budget)."),
    latency_batch: int = typer.Option(250, "--latency-batch", min=1, help="Batch size the latency table is measured at (the bench's)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Run only up to this stage: intervals, elastic, agent or final (each resumes)."),
    sampler: Optional[str] = typer.Option(None, help="The sampling run the budget is counted on: the model's teacher sampler by default (ddim; flow-euler on a flow-matching model such as the default transformer)."),
    steps: int = typer.Option(100, "--steps", min=1, help="Steps of that sampling run."),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="Number of intervals (default: knee rule)."),
    elastic_steps: int = typer.Option(200, min=1, help="Sandwich-rule steps per elastic expert."),
    agent_steps: int = typer.Option(150, min=1, help="Routing agent steps."),
    agent_score: str = typer.Option("teacher", "--agent-score", help="What the agent compares sub-networks on: teacher (their distance to the teacher's prediction) or denoise (the denoising + distillation loss, as before 2026-12)."),
    agent_spend: float = typer.Option(0.9, "--agent-spend", help="The final choice spends at least this fraction of the budget, where a setting does (0: the most probable setting within the budget, as before 2026-12)."),
    final_steps: int = typer.Option(1200, min=1, help="Fine-tuning steps per extracted expert."),
    batch_size: int = typer.Option(64, min=1),
    seed: int = typer.Option(0, min=0, max=2**32 - 1),
    baselines: bool = typer.Option(False, "--baselines", help="Also build the Diff-Pruning single model and the uniform-width experts at the same MACs."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (of each worker with --workers)."),
    workers: Optional[int] = WorkersOpt,
    ray_address: Optional[str] = RayAddressOpt,
    gpus_per_worker: float = GpusOpt,
):
    """Prune the model into a mixture of interval experts (DiffPruning) under a MACs budget.

    Stages: intervals -> elastic fine-tuning -> routing agent -> extraction + final fine-tuning.
    The result, OUT/budget-B/mixture, works as --model for sample, evaluate, search and bench.
    """
    import time

    from ..experts.baselines import pruned_baseline, uniform_experts
    from ..experts.pipeline import STAGES, ExpertsConfig, ExpertsPipeline
    from ..models import load_model
    from ..outputs import check_folder_target, run_folder

    set_threads(threads)
    check_folder_target(out)
    pool = workers_from_options(workers, ray_address, threads, gpus_per_worker)
    if stage is not None and stage not in STAGES:
        raise FlexdiffError(f"--stage {stage!r}; accepted: {', '.join(STAGES)}")
    loaded = load_model(model)
    from ..samplers import check_sampler_fits, default_sampler

    sampler = check_sampler_fits(sampler, loaded.scheduler_config) if sampler is not None else \
        default_sampler(loaded.scheduler_config)
    cfg = ExpertsConfig(budget=budget, sampler=sampler, num_steps=steps, k=k, elastic_steps=elastic_steps,
                        agent_steps=agent_steps, agent_score=agent_score, agent_spend=agent_spend,
                        final_steps=final_steps, batch_size=batch_size, seed=seed,
                        budget_kind=budget_kind, latency_batch=latency_batch)
    images = training_images_from_option(data, loaded)
    t0 = time.perf_counter()
    with run_folder(out), progress_bar() as progress:
        pipe = ExpertsPipeline(loaded, out, cfg, images, progress, workers=pool)
        stages = STAGES if stage is None else STAGES[:STAGES.index(stage) + 1]
        result = pipe.run(stages)
        if baselines and result is not None:
            uniform_experts(pipe)
            pruned_baseline(pipe)
    took = time.perf_counter() - t0
    if result is None:
        console.print(f"stage {stage} done in {took:.0f} s -> {out}", markup=False, highlight=False)
        return
    from ..io import read_json_object
    from ..mixture import describe_manifest

    lines = describe_manifest(read_json_object(result / "mixture.json", "the mixture manifest"))
    lines[0] += f", built in {took:.0f} s -> {result}"
    console.print("\n".join(lines), markup=False, highlight=False)
