"""flexdiff bench: the teacher and its peers side by side on the same noise."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from ..errors import FlexdiffError
from .app import (
    DeviceOpt,
    DtypeOpt,
    GuidanceOpt,
    LabelsOpt,
    ModelOpt,
    NegativeOpt,
    PromptOpt,
    PromptsOpt,
    app,
    check_schedule,
    console,
    labels_from_options,
    parse_floats,
    parse_ints,
    parse_row_ints,
    placement_from_options,
    progress_bar,
    prompts_for_config,
    set_threads,
    user_errors,
)


@app.command()
@user_errors
def bench(
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Folder for bench.md, bench.json, bench.png, samples.png (and a resumable cache)."),
    model: Optional[Path] = ModelOpt,
    preset: str = typer.Option("quick", help="quick (make bench's first table, about 12 minutes on 2 cores), full (docs/bench.md), search (docs/search.md: the searches at 1/8, 1/16, 1/25 against the solvers) transformer (a flow-matching transformer against diffusers' cache hooks) or transformer-quick (make bench's second table, about 13 minutes)."),
    samples: Optional[int] = typer.Option(None, min=2, help="Override the preset's samples per method."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the shared initial noise."),
    teacher_steps: Optional[int] = typer.Option(None, min=1, help="Teacher DDIM steps (preset: 100)."),
    ddim_steps: Optional[str] = typer.Option(None, help="DDIM (flow Euler on a flow model) step counts, e.g. 5,10,20,50, or 'none'."),
    dpm_steps: Optional[str] = typer.Option(None, help="DPM-Solver++ step counts, e.g. 5,10,20, or 'none'."),
    unipc_steps: Optional[str] = typer.Option(None, help="UniPC step counts, e.g. 5,10, or 'none' (preset quick: 5,10)."),
    deepcache: Optional[str] = typer.Option(None, help="DeepCache (FORA-style on a transformer) intervals N (uniform 1:N), e.g. 2,3,5, or 'none'."),
    delta_dit: Optional[str] = typer.Option(None, "--delta-dit", help="Transformers: Δ-DiT-style cache intervals, e.g. 2,4, or 'none' (preset transformer: 2,4)."),
    deepcache_branches: Optional[str] = typer.Option(None, help="DeepCache branches, e.g. 0,2."),
    schedule: list[Path] = typer.Option([], "--schedule", help="Extra schedule JSON files to include (repeatable)."),
    search_budgets: Optional[str] = typer.Option(None, help="Run Flexiffusion (and AutoDiffusion-style) searches at these budgets (fractions of the teacher's MACs, e.g. 0.1,0.0625), or 'none'."),
    search_generations: Optional[int] = typer.Option(None, min=0, help="Generations of each search (preset: 6 quick, 10 full)."),
    search_population: Optional[int] = typer.Option(None, min=2, help="Population of each search."),
    search_eval_samples: Optional[int] = typer.Option(None, min=8, help="Evaluation samples per candidate in the searches."),
    autodiffusion: Optional[bool] = typer.Option(None, "--autodiffusion/--no-autodiffusion", help="Also run the AutoDiffusion-style peer search."),
    mixture: list[Path] = typer.Option([], "--mixture", help="Mixture-of-experts folders to include (repeatable); 'default' is the shipped one."),
    expert_budgets: Optional[str] = typer.Option(None, help="Build mixtures of experts at these budgets (fractions of the teacher's MACs, e.g. 0.5,0.4) with their baselines, or 'none'."),
    expert_final_steps: Optional[int] = typer.Option(None, "--expert-final-steps", min=1, help="Fine-tuning steps per extracted expert (default 1200); the baselines get as many."),
    expert_budget_kind: Optional[str] = typer.Option(None, "--expert-budget-kind", help="What the expert budgets count: macs (default) or latency (measured once on this machine)."),
    composed: Optional[str] = typer.Option(None, "--composed", help="Search a schedule over each mixture at these speed-ups against the original teacher (e.g. 20), or 'none'."),
    hooks: Optional[str] = typer.Option(None, "--hooks", help="Transformers: diffusers' cache hooks as peers, KIND:SETTING items (fbc:THRESHOLD, taylorseer:INTERVAL, magcache:THRESHOLD, pab:SKIP, fastercache:SKIP), or 'none'. Preset transformer: ten (two per hook; docs/bench.md)."),
    hook_steps: Optional[int] = typer.Option(None, "--hook-steps", min=2, help="Steps of the plain sampler the hooks run over (preset transformer: 50)."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Standard FID with pytorch-fid weights from this file."),
    real_data: Optional[Path] = typer.Option(None, "--real-data", help="Folder of real images (default: the digits)."),
    labels: Optional[str] = LabelsOpt,
    guidance: float = GuidanceOpt,
    prompt: Optional[list[str]] = PromptOpt,
    prompts: Optional[Path] = PromptsOpt,
    negative_prompt: Optional[str] = NegativeOpt,
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Run the teacher and the peers side by side on the same noise; write a table, a plot and sample grids."""
    from ..bench import config_from_options, markdown_table, run_bench
    from ..bench.methods import parse_hook_peers
    from ..metrics import meter_for
    from ..models import load_model
    from ..outputs import check_folder_target, run_folder
    from ..schedule import Schedule

    set_threads(threads)
    placed = placement_from_options(device, dtype)
    cfg = config_from_options(
        preset, samples=samples, seed=seed, teacher_steps=teacher_steps,
        ddim_steps=parse_row_ints(ddim_steps, "--ddim-steps"),
        dpm_steps=parse_row_ints(dpm_steps, "--dpm-steps"),
        unipc_steps=parse_row_ints(unipc_steps, "--unipc-steps"),
        deepcache_intervals=parse_row_ints(deepcache, "--deepcache"),
        delta_dit_intervals=parse_row_ints(delta_dit, "--delta-dit"),
        deepcache_branches=None if deepcache_branches is None else parse_ints(deepcache_branches, "--deepcache-branches", minimum=0),
        search_budgets=() if search_budgets == "none" else parse_floats(search_budgets, "--search-budgets"),
        expert_budgets=() if expert_budgets == "none" else parse_floats(expert_budgets, "--expert-budgets"),
        composed_speedups=() if composed == "none" else parse_floats(composed, "--composed"),
        search_generations=search_generations, search_population=search_population,
        search_eval_samples=search_eval_samples, autodiffusion=autodiffusion,
        hook_peers=() if hooks == "none" else None if hooks is None else parse_hook_peers(hooks), hook_steps=hook_steps,
        mixtures=tuple(str(p) for p in mixture) or None,
        expert_settings=tuple((k, v) for k, v in (("final_steps", expert_final_steps),
                                                  ("budget_kind", expert_budget_kind)) if v is not None) or None,
    )
    check_folder_target(out)
    loaded = load_model(model, device=placed[0], dtype=placed[1])
    extra = tuple(Schedule.load(p) for p in schedule)
    for path, sched in zip(schedule, extra):  # named by file, before hours of searches and sampling
        check_schedule(sched, loaded, f"--schedule {path}")
    for path in mixture:
        if str(path) != "default":
            load_model(path)  # a broken mixture folder is refused now, not after the searches
    from ..anatomy import anatomy, num_branches

    nb = num_branches(loaded.unet)
    if any(b >= nb for b in cfg.deepcache_branches):  # refused before the output folder is made
        given = f"--deepcache-branches {deepcache_branches}" if deepcache_branches is not None else \
            f"the {preset} preset's DeepCache branches {list(cfg.deepcache_branches)} (set --deepcache-branches)"
        raise FlexdiffError(f"{given}: the model at {loaded.path} has branches 0..{nb - 1}")
    if cfg.hook_peers and not hasattr(anatomy(loaded.unet), "branches"):
        given = f"--hooks {hooks}" if hooks is not None else f"the {preset} preset's hook peers"
        raise FlexdiffError(f"{given}: diffusers' cache hooks run on transformers; the model at {loaded.path} is a "
                            f"{type(loaded.unet).__name__} (give --hooks none)")
    cfg = replace(cfg, labels=labels_from_options(loaded, labels, guidance), guidance=guidance,
                  prompts=prompts_for_config(loaded, prompt, prompts, negative_prompt, guidance),
                  negative_prompt=negative_prompt)
    meter = meter_for(loaded, inception_weights, real_data)
    with run_folder(out), progress_bar() as progress:
        result = run_bench(loaded, cfg, out, meter, extra, progress=progress)
    console.print(markdown_table(result), highlight=False, soft_wrap=True, markup=False)
    console.print(f"wrote {out}/bench.md, bench.json, bench.png, samples.png")
