"""`flexdiff bench`: methods side by side, one run, same model, same initial noise.

Every method samples from the same x_T as the teacher, so quality is reported both as FID
against real data and as paired differences to the teacher. Results of each method are
stored as they finish; a killed bench started again reuses them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .cost import measure_step_costs
from .io import load_cache, save_figure, save_safetensors, write_json, write_text
from .metrics import QualityMeter
from .models import LoadedModel, weights_fingerprint
from .sampling import class_conditioning, initial_noise, sample
from .schedule import Schedule

FAMILY_STYLE = {  # colour, marker
    "teacher": ("black", "*"),
    "ddim": ("tab:blue", "o"),
    "dpmsolver++": ("tab:orange", "s"),
    "deepcache": ("tab:green", "^"),
    "deepcache-nu": ("tab:olive", "v"),
    "autodiffusion": ("tab:purple", "P"),
    "flexiffusion": ("tab:red", "D"),
    "schedule": ("tab:brown", "X"),
    "experts": ("tab:cyan", "h"),
    "experts+schedule": ("teal", "d"),
    "experts-uniform": ("tab:pink", "p"),
    "diff-pruning": ("tab:gray", "8"),
}


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    schedule: Schedule
    model: str | None = None  # another model folder (a mixture, a pruned UNet); None = the bench's model


@dataclass(frozen=True)
class BenchConfig:
    samples: int = 1000
    seed: int = 0
    batch_size: int = 250
    teacher_steps: int = 100
    labels: tuple[int, ...] = ()  # class-conditional models: labels cycled over the samples; () = unconditional
    guidance: float = 1.0  # classifier-free guidance scale, the same for every method
    ddim_steps: tuple[int, ...] = (5, 10, 20, 50)
    dpm_steps: tuple[int, ...] = (5, 10, 20)
    deepcache_intervals: tuple[int, ...] = (2, 3, 5)
    deepcache_branches: tuple[int, ...] = (0, 2)
    deepcache_nonuniform: tuple[int, ...] = (3, 5)  # intervals of non-uniform DeepCache (branch 0)
    # Searches run inside the bench (each resumable under out/searches/): budgets as fractions of the teacher
    search_budgets: tuple[float, ...] = ()
    search_population: int = 16
    search_generations: int = 10
    search_eval_samples: int = 256
    flexiffusion_metrics: tuple[str, ...] = ("distance", "fid")  # one Flexiffusion search per fitness
    autodiffusion: bool = True  # also run the AutoDiffusion-style peer search at each budget
    # Mixtures of experts: pre-built mixture folders ("default" = the one shipped for the default model),
    # and budgets at which the bench builds its own (resumable under out/experts/), each with its two
    # baselines at the same MACs: uniform-width experts and a single Diff-Pruning-style pruned model
    mixtures: tuple[str, ...] = ()
    expert_budgets: tuple[float, ...] = ()
    mixture_deepcache: int = 3  # also run each mixture with DeepCache 1:N at branch 0 (0 = no)
    expert_settings: tuple[tuple[str, object], ...] = ()  # ExpertsConfig fields to change, as (name, value)

    def methods(self, extra: tuple[Schedule, ...] = (), searched: tuple[tuple[str, Schedule], ...] = ()) -> list[Method]:
        t = self.teacher_steps
        out = [Method(f"teacher DDIM-{t}", "teacher", Schedule.full("ddim", t))]
        out += [Method(f"DDIM-{s}", "ddim", Schedule.full("ddim", s)) for s in self.ddim_steps]
        out += [Method(f"DPM-Solver++-{s}", "dpmsolver++", Schedule.full("dpmsolver++", s)) for s in self.dpm_steps]
        out += [
            Method(f"DeepCache 1:{n} b{b} (DDIM-{t})", "deepcache", Schedule.deepcache("ddim", t, n, b))
            for b in self.deepcache_branches for n in self.deepcache_intervals
        ]
        out += [
            Method(f"DeepCache non-uniform 1:{n} b0 (DDIM-{t})", "deepcache-nu", Schedule.deepcache_nonuniform("ddim", t, n, 0))
            for n in self.deepcache_nonuniform
        ]
        out += [Method(s.name, family, s) for family, s in searched]
        out += [Method(s.name or f"schedule {i}", "schedule", s) for i, s in enumerate(extra)]
        return out


PRESETS = {
    # the README's main job: about 6 minutes on 2 cores
    "quick": BenchConfig(samples=500, ddim_steps=(10, 20, 50), dpm_steps=(5, 10), deepcache_intervals=(3, 5),
                         deepcache_branches=(0, 2), deepcache_nonuniform=(5,), search_budgets=(1 / 16,),
                         search_population=12, search_generations=6, search_eval_samples=128,
                         mixtures=("default",)),
    # the docs' table: about 2 hours on 2 cores (searches, two mixtures with their baselines)
    "full": BenchConfig(samples=2000, search_budgets=(1 / 16, 1 / 25), expert_budgets=(0.5, 0.4)),
}


def _model_fingerprint(model: LoadedModel) -> str:
    return weights_fingerprint(model.unet)


def _method_key(fingerprint: str, method: Method, cfg: BenchConfig) -> str:
    blob = json.dumps([fingerprint, method.schedule.key(), cfg.samples, cfg.seed, cfg.batch_size]
                      + ([list(cfg.labels), cfg.guidance] if cfg.labels else []), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_searches(model: LoadedModel, cfg: BenchConfig, out_dir: Path, meter: QualityMeter, costs,
                 progress=None) -> tuple[tuple[tuple[str, Schedule], ...], dict[str, float]]:
    """Flexiffusion (and the AutoDiffusion-style peer) at each budget; each search resumes from its folder."""
    from .search import SearchConfig, SegmentSpace, StepwiseSpace, search_from_settings

    found, seconds = [], {}
    for budget in cfg.search_budgets:
        runs = [("flexiffusion", SegmentSpace(), metric) for metric in cfg.flexiffusion_metrics]
        if cfg.autodiffusion:
            runs.append(("autodiffusion", StepwiseSpace(), "fid"))  # AutoDiffusion scores by FID to real data
        for family, space, metric in runs:
            scfg = SearchConfig(budget=budget, population=cfg.search_population, generations=cfg.search_generations,
                                eval_samples=cfg.search_eval_samples, metric=metric, seed=cfg.seed,
                                teacher_steps=cfg.teacher_steps, labels=cfg.labels, guidance=cfg.guidance)
            folder = out_dir / "searches" / (f"{family}-{metric}-{1 / budget:g}x" if family == "flexiffusion"
                                              else f"{family}-{1 / budget:g}x")
            result = search_from_settings(model, meter, space, scfg, folder, progress=progress,
                                          teacher_cache=out_dir / "searches", costs=costs).run()
            label = f"Flexiffusion [{metric}]" if family == "flexiffusion" else "AutoDiffusion-style [fid]"
            name = f"{label} ≤1/{1 / budget:g} ({result.best.describe().split(' (')[0]})"
            found.append((family, replace(result.best, name=name)))
            seconds[name] = result.seconds
    return tuple(found), seconds


def mixture_methods(model: LoadedModel, cfg: BenchConfig, out_dir: Path, progress=None) -> list[Method]:
    """The mixtures of experts (shipped or built here at each budget) and their baselines, on the teacher's sampler."""
    from .experts.pipeline import ExpertsConfig, ExpertsPipeline
    from .models import default_mixture_dir

    t = cfg.teacher_steps
    full = Schedule.full("ddim", t)
    out = []

    def with_schedule(label: str, path: Path) -> list[Method]:
        rows = [Method(f"{label} (DDIM-{t})", "experts", full, str(path))]
        if cfg.mixture_deepcache:
            n = cfg.mixture_deepcache
            rows.append(Method(f"{label} + DeepCache 1:{n} b0 (DDIM-{t})", "experts+schedule",
                               Schedule.deepcache("ddim", t, n, 0), str(path)))
        return rows

    from .models import default_model_dir

    for name in cfg.mixtures:
        if name == "default" and Path(model.path).resolve() != default_model_dir().resolve():
            continue  # the shipped mixture was pruned from the shipped model: it is no peer of another model
        path = default_mixture_dir() if name == "default" else Path(name)
        label = "mixture of experts (shipped)" if name == "default" else f"mixture {path.name}"
        out += with_schedule(label, path)
    for budget in cfg.expert_budgets:
        ecfg = ExpertsConfig.from_dict({**dict(cfg.expert_settings), "budget": budget, "num_steps": t})
        pipe = ExpertsPipeline(model, out_dir / "experts", ecfg, progress=progress)
        out += with_schedule(f"mixture of experts ≤{budget:g}", pipe.final(budget))
        out.append(Method(f"uniform-width experts ≈{budget:g} (DDIM-{t})", "experts-uniform", full,
                          str(pipe.uniform_experts(budget))))
        out.append(Method(f"Diff-Pruning single model ≈{budget:g} (DDIM-{t})", "diff-pruning", full,
                          str(pipe.pruned_baseline(budget))))
    return out


def run_bench(model: LoadedModel, cfg: BenchConfig, out_dir: Path, meter: QualityMeter,
              extra: tuple[Schedule, ...] = (), progress=None) -> dict:
    from .models import load_model

    out_dir = Path(out_dir)
    cache_dir = out_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    guided = cfg.guidance != 1.0
    costs = measure_step_costs(model.unet, guidance=guided)
    searched, search_seconds = run_searches(model, cfg, out_dir, meter, costs, progress)
    methods = cfg.methods(extra, searched) + mixture_methods(model, cfg, out_dir, progress)
    models = {None: (model, costs, _model_fingerprint(model))}
    unique, seen = [], set()
    for m in methods:
        if m.model not in models:
            other = load_model(m.model)
            models[m.model] = (other, measure_step_costs(other.unet, guidance=guided), _model_fingerprint(other))
        m.schedule.check_fits(len(models[m.model][1].partial))
        key = (models[m.model][2], m.schedule.key())  # sampler, timesteps and steps: what runs
        if key not in seen:  # e.g. a baseline that came out the same at two budgets: one row
            seen.add(key)
            unique.append(m)
    methods = unique
    c = model.unet.config
    noise = initial_noise(cfg.samples, (c.in_channels, c.sample_size, c.sample_size), cfg.seed)
    cond = class_conditioning(model.unet, cfg.labels, cfg.samples, cfg.guidance)
    fp = models[None][2]

    task = progress.add_task("bench", total=len(methods)) if progress else None
    runs = []
    for m in methods:
        m_model, _, m_fp = models[m.model]
        path = cache_dir / f"{_method_key(m_fp, m, cfg)}.safetensors"
        stored = load_cache(path)  # a truncated file from a killed run is redrawn
        if stored is not None and stored.get("images") is not None and "seconds" in stored:
            images, seconds, resumed = stored["images"], float(stored["seconds"]), True
        else:
            r = sample(m_model.unet, m_model.scheduler_config, m.schedule, noise, cfg.batch_size,
                       cond=cond, progress=progress, description=m.name)
            images, seconds, resumed = r.images, r.seconds, False
            save_safetensors(path, {"images": images, "seconds": torch.tensor(seconds)})
        runs.append((m, images, seconds, resumed))
        if task is not None:
            progress.update(task, advance=1)

    feats_by_name = {}
    teacher_feats = meter.features(runs[0][1])
    teacher_macs = costs.schedule_macs(runs[0][0].schedule)
    teacher_sec = runs[0][2]
    rows = []
    for m, images, seconds, resumed in runs:
        feats = teacher_feats if m.family == "teacher" else meter.features(images)
        feats_by_name[m.name] = feats
        metrics = meter.report(feats, None if m.family == "teacher" else teacher_feats)
        macs = models[m.model][1].schedule_macs(m.schedule)
        rows.append(dict(
            method=m.name, family=m.family, schedule=m.schedule.to_dict(), model=m.model,
            counts=m.schedule.counts(), macs_per_image=macs,
            speedup_macs=teacher_macs / macs, seconds=seconds,
            ms_per_image=1000 * seconds / cfg.samples, speedup_wall=teacher_sec / seconds,
            resumed=resumed, search_seconds=search_seconds.get(m.name),
            metrics={k: v.to_dict() for k, v in metrics.items()},
        ))
    result = dict(
        config=dict(cfg.__dict__), model=str(model.path), model_fingerprint=fp,
        mixture_vs_baselines=_mixture_comparisons(runs, feats_by_name, meter),
        feature_space=meter.name, headline=meter.headline, step_costs=costs.to_dict(), threads=torch.get_num_threads(),
        rows=rows,
    )
    write_json(out_dir / "bench.json", result)
    write_text(out_dir / "bench.md", markdown_table(result))
    plot_bench(result, out_dir / "bench.png")
    save_comparison_grid(runs, out_dir / "samples.png")
    return result


def _mixture_comparisons(runs, feats_by_name: dict, meter: QualityMeter) -> list[dict]:
    """Each mixture (alone, on the teacher's sampler) against each baseline, paired on the same noise."""
    mixtures = [m for m, *_ in runs if m.family == "experts"]
    baselines = [m for m, *_ in runs if m.family in ("experts-uniform", "diff-pruning")]
    return [dict(mixture=a.name, baseline=b.name, metric=meter.headline,
                 difference=meter.paired(feats_by_name[a.name], feats_by_name[b.name]).to_dict())
            for a in mixtures for b in baselines]


def _est(d: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    if d is None:
        return "—"
    return f"{d['value'] * scale:.{digits}f} ± {(d['hi'] - d['lo']) / 2 * scale:.{digits}f}"


HEADLINE_LABELS = {"cbfd": "cbFD", "fid": "FID"}


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    head = result.get("headline", "fid")
    label = HEADLINE_LABELS[head]
    balanced = head == "cbfd"
    lines = [
        f"Samples per method: {cfg['samples']} (seed {cfg['seed']}, same initial noise for every method); "
        f"feature space: {result['feature_space']}; intervals: 95% (bootstrap standard error, ± half-width); "
        f"torch threads: {result['threads']}; "
        + (f"class labels {', '.join(map(str, cfg['labels']))} with guidance {cfg['guidance']:g}"
           if cfg.get("labels") else "unconditional") + ". Lower is better for every quality column"
        + ("; cbFD is the class-balanced Fréchet distance and class TV the class-mix distance of docs/metrics.md"
           if balanced else "") + ".",
        "",
        f"| method | steps (full/partial/null) | MACs/image (M) | speed-up (MACs) | speed-up (wall) | ms/image "
        f"| {label} | {label} − teacher (paired) |" + (" class TV |" if balanced else "")
        + " FID | FID − teacher (paired) | rFID | teacher dist. |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if balanced else "") + "---|---|---|---|",
    ]
    for r in result["rows"]:
        m, c = r["metrics"], r["counts"]
        lines.append(
            f"| {r['method']} | {c['full']}/{c['partial']}/{c['null']} | {r['macs_per_image'] / 1e6:,.0f} "
            f"| {r['speedup_macs']:.2f}x | {r['speedup_wall']:.2f}x | {r['ms_per_image']:.1f} "
            f"| {_est(m[head])} | {_est(m.get(head + '_minus_teacher'))} |"
            + (f" {_est(m.get('class_tv'), 3)} |" if balanced else "")
            + f" {_est(m['fid'])} | {_est(m.get('fid_minus_teacher'))} "
            f"| {_est(m.get('rfid'))} | {_est(m.get('teacher_distance'))} |"
        )
    if result.get("mixture_vs_baselines"):
        lines += ["", "Mixtures against their baselines, paired on the same noise (negative: the mixture is better):", "",
                  f"| mixture | baseline | {label}(mixture) − {label}(baseline) |", "|---|---|---|"]
        lines += [f"| {c['mixture']} | {c['baseline']} | {_est(c['difference'])} |"
                  for c in result["mixture_vs_baselines"]]
    searched = [r for r in result["rows"] if r.get("search_seconds") is not None]
    if searched:
        lines += ["", "Search wall time (on top of sampling the table): " + "; ".join(
            f"{r['method']}: {r['search_seconds']:.0f} s" for r in searched) + "."]
    return "\n".join(lines) + "\n"


def plot_bench(result: dict, path: Path) -> Path:
    """Left: the headline quality against real data. Right: its paired difference to the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    head = result.get("headline", "fid")
    label = HEADLINE_LABELS[head]
    panels = ((head, f"{label} vs real data"), (head + "_minus_teacher", f"{label} − teacher {label} (paired, same noise)"))
    teacher_fid = result["rows"][0]["metrics"][head]["value"]
    for ax, (key, title) in zip(axes, panels):
        seen = set()
        for r in result["rows"]:
            e = r["metrics"].get(key, {"value": 0.0, "lo": 0.0, "hi": 0.0} if r["family"] == "teacher" else None)
            if e is None:
                continue
            color, marker = FAMILY_STYLE.get(r["family"], ("gray", "x"))
            ax.errorbar(r["macs_per_image"] / 1e9, e["value"], yerr=[[e["value"] - e["lo"]], [e["hi"] - e["value"]]],
                        fmt=marker, color=color, label=None if r["family"] in seen else r["family"],
                        ms=9 if r["family"] == "teacher" else 6, capsize=2)
            seen.add(r["family"])
        for frac, ls in ((0.05, "--"), (0.10, ":")):
            d = frac * teacher_fid
            ax.axhline(teacher_fid + d if key == head else d, color="gray", ls=ls, lw=0.8,
                       label=f"teacher {label} + {frac:.0%}")
        if key != head:
            ax.axhline(0, color="black", lw=0.6)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("GMACs per image, whole sampling run (log)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"{label} ({result['feature_space']} features)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Quality vs cost — {result['config']['samples']} samples per method, same noise, 95% intervals")
    save_figure(path, fig)
    plt.close(fig)
    return path


def save_comparison_grid(runs, path: Path, per_row: int = 12) -> Path:
    """One row per method, the same initial noise in each column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .grids import grid_array

    fig, axes = plt.subplots(len(runs), 1, figsize=(per_row * 0.55, len(runs) * 0.62 + 0.3))
    axes = np.atleast_1d(axes)
    for ax, (m, images, _, _) in zip(axes, runs):
        arr = grid_array(images[:per_row], ncol=per_row, scale=2)
        ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(m.name, rotation=0, ha="right", va="center", fontsize=7)
    save_figure(path, fig)
    plt.close(fig)
    return path
