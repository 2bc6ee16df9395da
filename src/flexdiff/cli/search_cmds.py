"""flexdiff search | proxy-study: find a schedule under a budget; check the search's proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import FlexdiffError
from .app import (
    DeviceOpt,
    DtypeOpt,
    GpusOpt,
    GuidanceOpt,
    LabelsOpt,
    ModelOpt,
    NegativeOpt,
    PromptOpt,
    PromptsOpt,
    RayAddressOpt,
    WorkersOpt,
    app,
    check_finite,
    console,
    labels_from_options,
    parse_ints,
    placement_from_options,
    progress_bar,
    prompts_for_config,
    set_threads,
    user_errors,
    workers_from_options,
)


@app.command()
@user_errors
def search(
    out: Path = typer.Option(Path("runs/search"), "--out", help="Folder for best.json, history.json, search.png (and front.json); holds the resumable state."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Max MACs per image as a fraction of the teacher's (DDIM-100), e.g. 0.0625."),
    speedup: Optional[float] = typer.Option(None, "--speedup", help="Or: the minimum speed-up in MACs (budget = 1/speedup)."),
    pareto: bool = typer.Option(False, "--pareto", help="Multi-objective (fitness vs MACs, NSGA-II): return the whole front (budget optional)."),
    space: str = typer.Option("segment", "--space", help="segment (Flexiffusion) or stepwise (AutoDiffusion-style: timesteps and per-step layer skipping)."),
    model: Optional[Path] = ModelOpt,
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Base sampler of the schedules: dpmsolver++ (default) | ddim | euler | unipc; on a flow-matching model flow-dpmsolver++ (default) | flow-euler | flow-unipc. Explicit timesteps (--ends, --space stepwise): dpmsolver++, euler, flow-euler."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Choices of the step count T (default 4,5,6,7,8,10,12,15,20,25; stepwise: 6,8,10,12)."),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="Choices of the segment length L, e.g. 1,2,3,4,5."),
    branches: Optional[str] = typer.Option(None, "--branches", help="Branches partial steps may use (default: all of the model's)."),
    ends: Optional[str] = typer.Option(None, "--ends", help="Segment space: choices of the last timestep, steps spread evenly from the noisiest down to it; 0 = the sampler's own spacing (default 0,50,100,200,300)."),
    population: int = typer.Option(16, min=2),
    generations: int = typer.Option(10, min=0),
    eval_samples: int = typer.Option(256, min=8, help="Samples per candidate, on fixed evaluation noise."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Fitness: rfid (FID to the teacher's samples; the default), distance (per-sample, to the teacher; the default without real data) or fid (quality vs real data: FID, or on the digits the class-balanced distance)."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the search and of the evaluation noise."),
    labels: Optional[str] = LabelsOpt,
    guidance: float = GuidanceOpt,
    prompt: Optional[list[str]] = PromptOpt,
    prompts: Optional[Path] = PromptsOpt,
    negative_prompt: Optional[str] = NegativeOpt,
    real_data: Optional[Path] = typer.Option(None, "--real-data", help="Folder of real images, for --metric fid on a model that is not the digits default."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="pytorch-fid Inception weights file (with --real-data)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Score against this model's DDIM run instead of the searched model's own: the original teacher of a mixture of experts or a pruned model ('default': the shipped model)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (of each worker with --workers)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    workers: Optional[int] = WorkersOpt,
    ray_address: Optional[str] = RayAddressOpt,
    gpus_per_worker: float = GpusOpt,
):
    """Search a schedule of full / partial / null steps that stays closest to the teacher under a MACs budget."""
    from ..anatomy import num_branches as count_branches
    from ..metrics import meter_for
    from ..mixture import original_teacher_macs
    from ..models import load_model
    from ..outputs import check_folder_target, run_folder
    from ..samplers import check_sampler, check_sampler_fits, is_flow, num_train_timesteps
    from ..search import SearchConfig, search_from_settings
    from ..search.fitness import default_metric
    from ..search.space import make_space

    set_threads(threads)
    placed = placement_from_options(device, dtype)
    check_folder_target(out)
    pool = workers_from_options(workers, ray_address, threads, gpus_per_worker)
    check_finite(budget, "--budget")
    check_finite(speedup, "--speedup")
    if budget is not None and speedup is not None:
        raise FlexdiffError("give either --budget or --speedup, not both")
    if speedup is not None:
        if speedup <= 1:
            raise FlexdiffError(f"--speedup {speedup}: must be > 1")
        budget = 1 / speedup
    if sampler is not None:
        check_sampler(sampler)
    loaded = load_model(model, device=placed[0], dtype=placed[1])
    sampler = sampler or ("flow-dpmsolver++" if is_flow(loaded.scheduler_config) else "dpmsolver++")
    check_sampler_fits(sampler, loaded.scheduler_config)
    reference_model = None if reference is None else \
        load_model(None if str(reference) == "default" else reference, "--reference", *placed)  # None: the shipped model
    sp = make_space(space, sampler, num_train_timesteps(loaded.scheduler_config), count_branches(loaded.unet),
                    step_choices=None if steps is None else parse_ints(steps, "--steps"),
                    length_choices=None if lengths is None else parse_ints(lengths, "--lengths"),
                    branches=None if branches is None else parse_ints(branches, "--branches", minimum=0),
                    end_choices=None if ends is None else parse_ints(ends, "--ends", minimum=0))
    meter = meter_for(loaded, inception_weights, real_data)
    metric = metric or default_metric(meter)
    cfg = SearchConfig(budget=budget, pareto=pareto, population=population, generations=generations,
                       eval_samples=eval_samples, metric=metric, seed=seed,
                       labels=labels_from_options(loaded, labels, guidance), guidance=guidance,
                       prompts=prompts_for_config(loaded, prompt, prompts, negative_prompt, guidance),
                       negative_prompt=negative_prompt)
    with run_folder(out), progress_bar() as progress:
        s = search_from_settings(loaded, meter, sp, cfg, out, progress=progress, workers=pool,
                                 reference=reference_model)
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
    if man:  # searching over a mixture: the budget counts its own DDIM run; say what that means for the original
        teacher_steps = cfg.teacher_steps
        original = original_teacher_macs(man, teacher_steps)
        scored = "the --reference model's" if reference else "the mixture's own"
        console.print(f"(the budget here counts the mixture's own DDIM-{teacher_steps}, and the candidates were scored "
                      f"against {scored}; against the original model's DDIM-{teacher_steps} this schedule is "
                      f"{original / b.meta['macs_per_image']:.1f}x cheaper)", markup=False, highlight=False)


@app.command("proxy-study")
@user_errors
def proxy_study_cmd(
    out: Path = typer.Option(Path("runs/proxy"), "--out"),
    model: Optional[Path] = ModelOpt,
    candidates: int = typer.Option(24, min=3, help="Schedules spread over the search space (or taken from --from-search)."),
    from_search: Optional[Path] = typer.Option(None, "--from-search", help="Rank the candidates a search scored (its --out folder), at evenly spaced ranks of its fitness: the proxy within one budget."),
    eval_samples: int = typer.Option(256, min=8, help="Samples for the proxies (as in the search)."),
    fid_samples: int = typer.Option(1000, min=8, help="Samples for the real FID of each candidate."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """How well do rFID and the per-sample distance rank candidates against the real FID (Spearman), and how much faster are they?"""
    from ..metrics import QualityMeter
    from ..models import load_model
    from ..outputs import check_folder_target, run_folder
    from ..search.proxy import proxy_study, proxy_table

    set_threads(threads)
    placed = placement_from_options(device, dtype)
    check_folder_target(out)
    loaded = load_model(model, device=placed[0], dtype=placed[1])
    meter = QualityMeter.for_loaded(loaded)
    schedules = None
    if from_search is not None:
        from ..fingerprints import weights_fingerprint
        from ..search.proxy import search_candidates

        schedules = search_candidates(from_search, candidates, weights_fingerprint(loaded.unet))
    with run_folder(out), progress_bar() as progress:
        res = proxy_study(loaded, meter, out, candidates, eval_samples, fid_samples, seed, progress=progress,
                          schedules=schedules, source=str(from_search) if from_search else "spread")
    console.print(proxy_table(res), highlight=False, soft_wrap=True, markup=False)
