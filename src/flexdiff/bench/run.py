"""Running the bench: the searches and mixtures it builds, then every method on the same noise,
each one's samples cached (keyed by the model's fingerprint and the schedule's key) as it finishes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..anatomy import anatomy, noise_shape
from ..cost import measure_step_costs, timing_machine
from ..devices import placement
from ..errors import FlexdiffError
from ..fingerprints import conditioning_tag, weights_fingerprint
from ..io import load_cache, save_safetensors, write_json, write_text
from ..metrics import QualityMeter
from ..metrics.paired import PixelMeter, paired_report
from ..models import LoadedModel
from ..sampling import initial_noise, model_conditioning, sample
from ..schedule import Schedule
from .methods import LABELS, BenchConfig, Method
from .peers import PeerRunner
from .report import markdown_table, mixture_comparisons, plot_bench, save_comparison_grid, search_comparisons

SEARCH_FAMILIES = ("flexiffusion", "autodiffusion")  # rows whose schedule a search chose


def _model_fingerprint(model: LoadedModel) -> str:
    return weights_fingerprint(model.unet)


def _conditioning_tag(cfg: BenchConfig) -> str:
    return conditioning_tag(cfg.labels, cfg.guidance, cfg.prompts, cfg.negative_prompt)


def _searches_dir(out_dir: Path, fingerprint: str, cfg: BenchConfig) -> Path:
    """One folder of searches per model, conditioning and seed (the searches' noise follows the bench's seed), so
    a bench at another seed in the same --out starts its own searches instead of meeting another's state."""
    return out_dir / "searches" / (f"{fingerprint}{_conditioning_tag(cfg)}" + (f"-seed{cfg.seed}" if cfg.seed else ""))


def _method_key(fingerprint: str, method: Method, cfg: BenchConfig) -> str:
    what = method.peer.key() if method.peer is not None else method.schedule.key()
    blob = json.dumps([fingerprint, what, cfg.samples, cfg.seed, cfg.batch_size]
                      + ([list(cfg.labels), cfg.guidance] if cfg.labels else [])
                      + ([_conditioning_tag(cfg)] if cfg.prompts or cfg.negative_prompt is not None else []),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_searches(model: LoadedModel, cfg: BenchConfig, out_dir: Path, meter: QualityMeter, costs,
                 progress=None, fingerprint: str | None = None) -> tuple[tuple[tuple[str, Schedule], ...], dict[str, float]]:
    """Flexiffusion (and the AutoDiffusion-style peer) at each budget; each search resumes from its folder.

    `fingerprint`: the model's weights fingerprint when the caller has it (hashing a large UNet takes seconds)."""
    fingerprint = fingerprint or _model_fingerprint(model)
    from ..anatomy import num_branches
    from ..samplers import is_flow, num_train_timesteps
    from ..search import SearchConfig, search_from_settings
    from ..search.space import make_space

    multistep = "flow-dpmsolver++" if is_flow(model.scheduler_config) else "dpmsolver++"

    def space(kind: str):  # the searches' default spaces, with this model's branches, solvers and timesteps
        sampler = "flow-euler" if kind == "stepwise" and multistep.startswith("flow") else multistep
        return make_space(kind, sampler, num_train_timesteps(model.scheduler_config), num_branches(model.unet))

    found, seconds = [], {}
    # one folder per model and conditioning: a bench rerun on another model (or with other labels)
    # starts its own searches, and never reuses another model's cached teacher
    base = _searches_dir(out_dir, fingerprint, cfg)
    relative = isinstance(meter, PixelMeter)  # no real data: every search scores the distance to the teacher
    metrics = ("distance",) if relative else cfg.flexiffusion_metrics
    for budget in cfg.search_budgets:
        runs = [("flexiffusion", space("segment"), metric) for metric in metrics]
        if cfg.autodiffusion:  # AutoDiffusion scores by FID to real data, where there is some
            runs.append(("autodiffusion", space("stepwise"), "distance" if relative else "fid"))
        for family, sp, metric in runs:
            scfg = SearchConfig(budget=budget, population=cfg.search_population, generations=cfg.search_generations,
                                eval_samples=cfg.search_eval_samples, metric=metric, seed=cfg.seed,
                                teacher_steps=cfg.teacher_steps, labels=cfg.labels, guidance=cfg.guidance,
                                prompts=cfg.prompts, negative_prompt=cfg.negative_prompt)
            folder = base / (f"{family}-{metric}-{1 / budget:g}x" if family == "flexiffusion"
                             else f"{family}-{1 / budget:g}x")
            result = search_from_settings(model, meter, sp, scfg, folder, progress=progress,
                                          teacher_cache=base, costs=costs, model_fingerprint=fingerprint).run()
            label = f"Flexiffusion [{metric}]" if family == "flexiffusion" else f"AutoDiffusion-style [{scfg.metric}]"
            name = f"{label} ≤1/{1 / budget:g} ({result.best.describe().split(' (')[0]})"
            found.append((family, replace(result.best, name=name)))
            seconds[name] = result.seconds
    return tuple(found), seconds


def mixture_methods(model: LoadedModel, cfg: BenchConfig, out_dir: Path, progress=None,
                    fingerprint: str | None = None) -> list[Method]:
    """The mixtures of experts (shipped or built here at each budget) and their baselines, on the teacher's sampler."""
    from ..experts.baselines import pruned_baseline, uniform_experts
    from ..experts.pipeline import ExpertsConfig, ExpertsPipeline
    from ..models import default_mixture_dir
    from ..samplers import default_sampler

    t, base = cfg.teacher_steps, default_sampler(model.scheduler_config)  # the teacher's sampler: DDIM, flow Euler
    full, lb = Schedule.full(base, t), LABELS[base]
    out = []

    def with_schedule(label: str, path: Path) -> list[Method]:
        rows = [Method(f"{label} ({lb}-{t})", "experts", full, str(path))]
        if cfg.mixture_deepcache:
            n = cfg.mixture_deepcache
            rows.append(Method(f"{label} + DeepCache 1:{n} b0 ({lb}-{t})", "experts+schedule",
                               Schedule.deepcache(base, t, n, 0), str(path)))
        return rows

    from ..models import default_model_dir

    for name in cfg.mixtures:
        if name == "default" and Path(model.path).resolve() != default_model_dir().resolve():
            continue  # the shipped mixture was pruned from the shipped model: it is no peer of another model
        path = default_mixture_dir() if name == "default" else Path(name)
        # a folder the experts pipeline wrote is always called "mixture": name it with its budget folder
        shown = f"{path.parent.name}/{path.name}" if path.name == "mixture" else path.name
        label = "mixture of experts (shipped)" if name == "default" else f"mixture {shown}"
        out += with_schedule(label, path)
    for budget in cfg.expert_budgets:
        ecfg = ExpertsConfig.from_dict({"sampler": base, **dict(cfg.expert_settings), "budget": budget, "num_steps": t})
        pipe = ExpertsPipeline(model, out_dir / "experts" / (fingerprint or _model_fingerprint(model)), ecfg,
                               progress=progress)
        kind = "" if ecfg.budget_kind == "macs" else f" of the {ecfg.budget_kind}"
        out += with_schedule(f"mixture of experts ≤{budget:g}{kind}", pipe.final(budget))
        out.append(Method(f"uniform-width experts ≈{budget:g} ({lb}-{t})", "experts-uniform", full,
                          str(uniform_experts(pipe, budget))))
        static = "TinyFusion-style" if getattr(anatomy(model.unet), "branches", None) else "Diff-Pruning"
        out.append(Method(f"{static} single model ≈{budget:g} ({lb}-{t})", "diff-pruning", full,
                          str(pruned_baseline(pipe, budget))))
    return out


def composed_methods(model: LoadedModel, cfg: BenchConfig, out_dir: Path, meter, mixtures: list[Method],
                     teacher_macs: float, progress=None, fingerprint: str | None = None) -> tuple[list[Method], dict[str, float]]:
    """Flexiffusion over each mixture: a schedule searched with the mixture as the model, at
    `cfg.composed_speedups` against the original teacher's MACs. The candidates are scored against the
    original teacher's run (what the bench measures), not the mixture's own: the search can then
    prefer the schedules that undo some of the mixture's error instead of copying it."""
    from ..anatomy import num_branches
    from ..cost import measure_step_costs
    from ..models import load_model
    from ..samplers import default_sampler, is_flow, num_train_timesteps
    from ..search import SearchConfig, search_from_settings
    from ..search.fitness import default_metric
    from ..search.space import make_space

    out, seconds = [], {}
    device, dtype = placement(model.unet)  # the mixtures run where the main model does
    for m in mixtures:
        mix = load_model(m.model, device=device, dtype=dtype)
        costs = measure_step_costs(mix.unet, guidance=cfg.guidance != 1.0, cross_attention_len=model.cross_attention_len)
        own = costs.schedule_macs(Schedule.full(default_sampler(mix.scheduler_config), cfg.teacher_steps))
        fp = _model_fingerprint(mix)
        for speedup in cfg.composed_speedups:
            budget = teacher_macs / (speedup * own)  # a fraction of the mixture's own run
            if budget >= 1:
                continue  # the mixture alone is already that cheap
            space = make_space("segment", "flow-dpmsolver++" if is_flow(mix.scheduler_config) else "dpmsolver++",
                               num_train_timesteps(mix.scheduler_config), num_branches(mix.unet))
            scfg = SearchConfig(budget=budget, population=cfg.search_population, generations=cfg.search_generations,
                                eval_samples=cfg.search_eval_samples, metric=default_metric(meter), seed=cfg.seed,
                                teacher_steps=cfg.teacher_steps, labels=cfg.labels, guidance=cfg.guidance,
                                prompts=cfg.prompts, negative_prompt=cfg.negative_prompt)
            base = _searches_dir(out_dir, fp, cfg)
            result = search_from_settings(
                mix, meter, space, scfg, base / f"composed-{scfg.metric}-{speedup:g}x-vs-teacher", progress=progress,
                teacher_cache=base, costs=costs, model_fingerprint=fp, reference=model,
                reference_cache=_searches_dir(out_dir, fingerprint or _model_fingerprint(model), cfg)).run()
            label = m.name.rsplit(" (", 1)[0]
            name = f"{label} + Flexiffusion [{scfg.metric}] ≤1/{speedup:g} ({result.best.describe().split(' (')[0]})"
            out.append(Method(name, "experts+search", replace(result.best, name=name), m.model))
            seconds[name] = result.seconds
    return out, seconds


def run_bench(model: LoadedModel, cfg: BenchConfig, out_dir: Path, meter: QualityMeter,
              extra: tuple[Schedule, ...] = (), progress=None) -> dict:
    from ..models import load_model

    out_dir = Path(out_dir)
    device, dtype = placement(model.unet)  # every model of the table runs where the main one does
    cache_dir = out_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    guided = cfg.guidance != 1.0
    costs = measure_step_costs(model.unet, guidance=guided, cross_attention_len=model.cross_attention_len)
    fp = _model_fingerprint(model)  # once: the searches, the mixtures' folders and the cache keys all use it
    searched, search_seconds = run_searches(model, cfg, out_dir, meter, costs, progress, fingerprint=fp)
    mixtures = mixture_methods(model, cfg, out_dir, progress, fingerprint=fp)
    composed, composed_seconds = composed_methods(model, cfg, out_dir, meter, [m for m in mixtures if m.family == "experts"],
                                                  costs.schedule_macs(Schedule.teacher(model.scheduler_config,
                                                                                       cfg.teacher_steps)),
                                                  progress, fingerprint=fp)
    search_seconds.update(composed_seconds)
    branches = getattr(anatomy(model.unet), "branches", None)  # a transformer's (F, B): FORA / Δ-DiT rows, hooks
    methods = cfg.methods(extra, searched, model.scheduler_config, branches) + mixtures + composed
    models = {None: (model, costs, fp)}
    unique, seen, same_as = [], {}, {}
    for m in methods:
        if m.model not in models:
            other = load_model(m.model, device=device, dtype=dtype)
            models[m.model] = (other, measure_step_costs(other.unet, guidance=guided,
                                                         cross_attention_len=model.cross_attention_len),
                               _model_fingerprint(other))
        m.schedule.check_fits(len(models[m.model][1].partial))
        key = (models[m.model][2], m.peer.key() if m.peer else m.schedule.key())  # what runs
        if key not in seen:  # e.g. a baseline that came out the same at two budgets: one row
            seen[key] = m.name
            unique.append(m)
        elif m.family in SEARCH_FAMILIES:  # a search that found a peer's schedule keeps its row (sampled once)
            same_as[m.name] = seen[key]
            unique.append(m)
    methods = unique
    noise = initial_noise(cfg.samples, noise_shape(model.unet), cfg.seed)
    cond = model_conditioning(model, cfg.samples, cfg.labels, cfg.prompts, cfg.negative_prompt, cfg.guidance)

    task = progress.add_task("bench", total=len(methods)) if progress else None
    runs, skipped = [], []
    # what each row's wall-clock was measured on: a row timed on another host or thread count is redrawn,
    # so one table's wall-clock column never mixes settings
    timing = torch.tensor(list(timing_machine(device, dtype).encode()), dtype=torch.uint8)
    counted: dict[str, list[float]] = {}  # a hook peer's MACs per image, batch by batch (counted as they ran)
    peer_runs = PeerRunner(model, noise, cond, cfg.batch_size, progress)
    for m in methods:
        if m.name in same_as:
            first = next(r for r in runs if r[0].name == same_as[m.name])
            runs.append((m, *first[1:]))
            if task is not None:
                progress.update(task, advance=1)
            continue
        m_model, _, m_fp = models[m.model]
        path = cache_dir / f"{_method_key(m_fp, m, cfg)}.safetensors"
        stored = load_cache(path)  # a truncated file from a killed run is redrawn
        if (stored is not None and stored.get("images") is not None and "seconds" in stored
                and torch.equal(stored.get("timing", torch.empty(0, dtype=torch.uint8)), timing)):
            images, seconds, resumed = stored["images"], float(stored["seconds"]), True
            if m.peer is not None:
                counted[m.name] = stored["macs"].tolist()
        elif m.peer is not None:
            try:
                r = peer_runs.run(m.peer)
            except FlexdiffError as e:  # a peer that cannot run on the model is listed with the reason
                skipped.append(dict(method=m.name, family=m.family, reason=str(e)))
                continue
            images, seconds, resumed = model.decode(r.images), r.seconds, False
            counted[m.name] = r.macs
            save_safetensors(path, {"images": images, "seconds": torch.tensor(seconds), "timing": timing,
                                    "macs": torch.tensor(r.macs, dtype=torch.float64)})
        else:
            r = sample(m_model.unet, m_model.scheduler_config, m.schedule, noise, cfg.batch_size,
                       cond=cond, progress=progress, description=m.name)
            # scored as the images a user sees (a latent model: decoded; the decoder's time is not the method's)
            images, seconds, resumed = model.decode(r.images), r.seconds, False
            save_safetensors(path, {"images": images, "seconds": torch.tensor(seconds), "timing": timing})
        runs.append((m, images, seconds, resumed))
        if task is not None:
            progress.update(task, advance=1)

    relative = isinstance(meter, PixelMeter)
    feats_by_name = {}
    teacher_feats = None if relative else meter.features(runs[0][1])
    teacher_macs = costs.schedule_macs(runs[0][0].schedule)
    teacher_sec = runs[0][2]
    rows = []
    for m, images, seconds, resumed in runs:
        if relative:  # no real data: how close each sample is to the teacher's, same noise and prompt
            metrics = {} if m.family == "teacher" else paired_report(images, runs[0][1])
        else:
            feats = teacher_feats if m.family == "teacher" else meter.features(images)
            feats_by_name[m.name] = feats
            metrics = meter.report(feats, None if m.family == "teacher" else teacher_feats)
        macs = (sum(counted[m.name]) / len(counted[m.name]) if m.peer is not None
                else models[m.model][1].schedule_macs(m.schedule))
        rows.append(dict(
            method=m.name, family=m.family, schedule=m.schedule.to_dict(), model=m.model,
            counts=m.schedule.counts(), macs_per_image=macs,
            speedup_macs=teacher_macs / macs, seconds=seconds,
            ms_per_image=1000 * seconds / cfg.samples, speedup_wall=teacher_sec / seconds,
            resumed=resumed, search_seconds=search_seconds.get(m.name),
            metrics={k: v.to_dict() for k, v in metrics.items()},
            **({"macs_per_batch": counted[m.name]} if m.peer is not None else {}),
            **({"same_as": same_as[m.name]} if m.name in same_as else {}),
        ))
    result = dict(
        config=asdict(cfg), model=str(model.path), model_fingerprint=fp,
        mixture_vs_baselines=[] if relative else mixture_comparisons(runs, feats_by_name, meter),
        search_vs_peers=[] if relative else search_comparisons(
            runs, feats_by_name, meter, {r["method"]: r["macs_per_image"] for r in rows},
            {r["method"]: r["metrics"][meter.headline]["value"] for r in rows}, teacher_macs),
        feature_space=meter.name, headline=meter.headline, step_costs=costs.to_dict(), threads=torch.get_num_threads(),
        rows=rows, skipped=skipped,
    )
    write_json(out_dir / "bench.json", result)
    write_text(out_dir / "bench.md", markdown_table(result))
    plot_bench(result, out_dir / "bench.png")
    save_comparison_grid(runs, out_dir / "samples.png")
    return result
