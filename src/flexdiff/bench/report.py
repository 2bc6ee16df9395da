"""The bench's report: the markdown table, the quality-vs-cost plot, the sample grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import save_figure
from ..metrics import QualityMeter, verdict

FAMILY_STYLE = {  # colour, marker
    "teacher": ("black", "*"),
    "ddim": ("tab:blue", "o"),
    "dpmsolver++": ("tab:orange", "s"),
    "unipc": ("goldenrod", "<"),
    "deepcache": ("tab:green", "^"),
    "deepcache-nu": ("tab:olive", "v"),
    "autodiffusion": ("tab:purple", "P"),
    "flexiffusion": ("tab:red", "D"),
    "schedule": ("tab:brown", "X"),
    "experts": ("tab:cyan", "h"),
    "experts+schedule": ("teal", "d"),
    "experts+search": ("darkred", "*"),
    "experts-uniform": ("tab:pink", "p"),
    "diff-pruning": ("tab:gray", "8"),
    "flow-euler": ("tab:blue", "o"),
    "fora": ("tab:green", "^"),
    "fora-nu": ("tab:olive", "v"),
    "delta-dit": ("darkgreen", ">"),
    "hook-fbc": ("slateblue", "1"),
    "hook-taylorseer": ("mediumorchid", "2"),
    "hook-magcache": ("navy", "3"),
    "hook-pab": ("sienna", "4"),
    "hook-fastercache": ("darkcyan", "+"),
}


def mixture_comparisons(runs, feats_by_name: dict, meter: QualityMeter) -> list[dict]:
    """Each mixture (alone, on the teacher's sampler) against each baseline, paired on the same noise."""
    mixtures = [m for m, *_ in runs if m.family == "experts"]
    baselines = [m for m, *_ in runs if m.family in ("experts-uniform", "diff-pruning")]
    return [dict(mixture=a.name, baseline=b.name, **_paired(meter, feats_by_name[a.name], feats_by_name[b.name]))
            for a in mixtures for b in baselines]


def _paired(meter: QualityMeter, a, b) -> dict:
    """A − B on the same noise: the headline and the class mix, and the verdict of docs/metrics.md's rule."""
    diff, tv = meter.paired(a, b), meter.paired_class_tv(a, b)
    return dict(metric=meter.headline, difference=diff.to_dict(),
                class_tv_difference=None if tv is None else tv.to_dict(), verdict=verdict(diff, tv))


def _best_by_family(peers, quality: dict[str, float]) -> dict[str, object]:
    """Each family's best method (lowest headline `quality`) among `peers`."""
    best: dict[str, object] = {}
    for p in peers:
        if p.family not in best or quality[p.name] < quality[best[p.family].name]:
            best[p.family] = p
    return best


# the peers a searched schedule must beat: the solvers, DeepCache and the other search
PEER_FAMILIES = ("ddim", "flow-euler", "dpmsolver++", "unipc", "deepcache", "deepcache-nu", "fora", "fora-nu",
                 "delta-dit", "hook-fbc", "hook-taylorseer", "hook-magcache", "hook-pab", "hook-fastercache",
                 "autodiffusion")


def search_comparisons(runs, feats_by_name: dict, meter: QualityMeter, macs: dict[str, float],
                       quality: dict[str, float], teacher_macs: float) -> list[dict]:
    """Each Flexiffusion schedule against the best peer of each family (by the headline `quality`) among those
    that fit the budget it was searched under (equal or lower MACs), paired on the same noise; and against each of
    diffusers' cache hooks at its best setting among those that spent at least the schedule's MACs (the hooks
    decide at run time, so their MACs land where they land). One pair per family: a paired bootstrap costs
    seconds."""
    out = []
    for m, *_ in runs:
        if m.family != "flexiffusion" or m.model is not None:
            continue
        limit = (m.schedule.meta.get("budget") or 1.0) * teacher_macs * (1 + 1e-9)
        peers = [p for p, *_ in runs if p.model is None]
        best = _best_by_family([p for p in peers if p.family in PEER_FAMILIES and macs[p.name] <= limit], quality)
        # each hook's best setting among those that spent at least the schedule's MACs
        above = _best_by_family([p for p in peers if p.family.startswith("hook-")
                                 and macs[p.name] >= macs[m.name] * (1 - 1e-9)], quality)
        pairs = [(family, best[family]) for family in PEER_FAMILIES if family in best]
        pairs += [(f, p) for f, p in above.items() if all(p is not q for _, q in pairs)]
        for family, p in pairs:
            out.append(dict(schedule=m.name, peer=p.name, peer_family=family, peer_macs=macs[p.name],
                            budget=m.schedule.meta.get("budget"),
                            **_paired(meter, feats_by_name[m.name], feats_by_name[p.name])))
    return out


def _est(d: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    if d is None:
        return "—"
    return f"{d['value'] * scale:.{digits}f} ± {(d['hi'] - d['lo']) / 2 * scale:.{digits}f}"


HEADLINE_LABELS = {"cbfd": "cbFD", "fid": "FID"}


def _steps(r: dict) -> str:
    c = r["counts"]
    return f"{c['full']} calls, run-time cache" if "macs_per_batch" in r else f"{c['full']}/{c['partial']}/{c['null']}"


def _macs(r: dict) -> str:
    """M MACs per image; a hook peer's: the mean over batches, with the range (it decides per call)."""
    text = f"{r['macs_per_image'] / 1e6:,.0f}"
    spread = r.get("macs_per_batch")
    if spread:
        text += f" [{min(spread) / 1e6:,.0f}–{max(spread) / 1e6:,.0f}]"
    return text


def _wall_share(row: dict) -> str:
    """The wall-clock speed-up as a share of the MACs speed-up: how much of the saving the machine delivers."""
    return f"{row['speedup_wall'] / row['speedup_macs']:.2f}"


def _relative_table(result: dict) -> str:
    """The table of a model without real data: every method against the teacher, same noise and prompts."""
    cfg = result["config"]
    cond = (f"{len(cfg['prompts'])} prompt(s)" if cfg.get("prompts") else "the empty prompt or unconditional") \
        + (f", guidance {cfg['guidance']:g}" if cfg.get("guidance", 1.0) != 1.0 else "")
    lines = [
        f"Samples per method: {cfg['samples']} (seed {cfg['seed']}, same initial noise and conditioning for every "
        f"method: {cond}); no real data, so quality is measured against the teacher's decoded image from the same "
        f"noise: PSNR and SSIM (higher: closer), RMSE in [-1, 1] units (lower); intervals: 95% (± half-width); "
        f"torch threads: {result['threads']}.", "",
        "| method | steps (full/partial/null) | MACs/image (M) | speed-up (MACs) | speed-up (wall) | wall / MACs "
        "| ms/image | PSNR to teacher (dB) | SSIM to teacher | RMSE to teacher |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        m, c = r["metrics"], r["counts"]
        lines.append(
            f"| {r['method']} | {c['full']}/{c['partial']}/{c['null']} | {r['macs_per_image'] / 1e6:,.0f} "
            f"| {r['speedup_macs']:.2f}x | {r['speedup_wall']:.2f}x | {_wall_share(r)} | {r['ms_per_image']:.1f} "
            f"| {_est(m.get('teacher psnr'))} | {_est(m.get('teacher ssim'), 3)} | {_est(m.get('teacher rmse'), 3)} |")
    return "\n".join(lines) + "\n"


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    if result.get("headline") == "distance":
        return _relative_table(result)
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
        f"| method | steps (full/partial/null) | MACs/image (M) | speed-up (MACs) | speed-up (wall) | wall / MACs "
        f"| ms/image | {label} | {label} − teacher (paired) |"
        + (" class TV | class TV − teacher (paired) | precision | recall |" if balanced else "")
        + " FID | FID − teacher (paired) | rFID | teacher dist. |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if balanced else "") + "---|---|---|---|",
    ]
    for r in result["rows"]:
        m, c = r["metrics"], r["counts"]
        lines.append(
            f"| {r['method']} | {_steps(r)} | {_macs(r)} "
            f"| {r['speedup_macs']:.2f}x | {r['speedup_wall']:.2f}x | {_wall_share(r)} | {r['ms_per_image']:.1f} "
            f"| {_est(m[head])} | {_est(m.get(head + '_minus_teacher'))} |"
            + (f" {_est(m.get('class_tv'), 3)} | {_est(m.get('class_tv_minus_teacher'), 3)} "
               f"| {_est(m.get('precision'), 3)} | {_est(m.get('recall'), 3)} |" if balanced else "")
            + f" {_est(m['fid'])} | {_est(m.get('fid_minus_teacher'))} "
            f"| {_est(m.get('rfid'))} | {_est(m.get('teacher_distance'))} |"
        )
    if any("macs_per_batch" in r for r in result["rows"]):
        lines += ["", "diffusers' cache hooks decide at run time: their steps are the calls asked for, and their MACs "
                  "were counted from what ran (torch's FLOP counter), the mean over batches with the range in "
                  "brackets."]
    same = [r for r in result["rows"] if r.get("same_as")]
    if same:
        lines += ["", "Searches whose best schedule is a peer's own (sampled once, shown on both rows):", ""]
        lines += [f"- {r['method']} = {r['same_as']}" for r in same]
    if result.get("skipped"):
        lines += ["", "Peers that could not run on this model:", ""]
        lines += [f"- {s['method']}: {s['reason']}" for s in result["skipped"]]
    if result.get("mixture_vs_baselines"):
        lines += ["", "Mixtures against their baselines, paired on the same noise (negative: the mixture is better):", "",
                  f"| mixture | baseline | {label}(mixture) − {label}(baseline) | class TV(mixture) − class TV(baseline) "
                  "| verdict |", "|---|---|---|---|---|"]
        lines += [f"| {c['mixture']} | {c['baseline']} | {_est(c['difference'])} | {_est(c.get('class_tv_difference'), 3)} "
                  f"| {c.get('verdict') or verdict(c['difference'], c.get('class_tv_difference'))} |"
                  for c in result["mixture_vs_baselines"]]
    if result.get("search_vs_peers"):
        lines += ["", "Flexiffusion schedules against the best peer of each family within their budget, and against "
                  "each of diffusers' cache hooks at its best setting that spent at least their MACs, paired on the "
                  "same noise (negative: the searched schedule is better; * where the interval excludes 0). The "
                  f"verdict follows the rule of docs/metrics.md: better only where {label} is separated better *and* "
                  "the class mix is not separated worse:", "",
                  f"| searched schedule | peer | peer's speed-up (MACs) | {label}(searched) − {label}(peer) "
                  "| class TV(searched) − class TV(peer) | verdict |", "|---|---|---|---|---|---|"]
        teacher_macs = result["rows"][0]["macs_per_image"]
        for c in result["search_vs_peers"]:
            d, tv = c["difference"], c.get("class_tv_difference")
            mark = " *" if d["lo"] > 0 or d["hi"] < 0 else ""
            tv_mark = " *" if tv and (tv["lo"] > 0 or tv["hi"] < 0) else ""
            lines.append(f"| {c['schedule']} | {c['peer']} | {teacher_macs / c['peer_macs']:.2f}x | {_est(d)}{mark} "
                         f"| {_est(tv, 3)}{tv_mark} | {c.get('verdict') or verdict(d, tv)} |")
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

    if result.get("headline") == "distance":
        return _plot_relative(result, path)
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


def _plot_relative(result: dict, path: Path) -> Path:
    """A model without real data: PSNR to the teacher against the cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    seen = set()
    for r in result["rows"]:
        e = r["metrics"].get("teacher psnr")
        if e is None:
            continue
        color, marker = FAMILY_STYLE.get(r["family"], ("gray", "x"))
        ax.errorbar(r["macs_per_image"] / 1e9, e["value"], yerr=[[e["value"] - e["lo"]], [e["hi"] - e["value"]]],
                    fmt=marker, color=color, label=None if r["family"] in seen else r["family"], capsize=2)
        seen.add(r["family"])
    ax.set_xscale("log")
    ax.set_xlabel("GMACs per image, whole sampling run (log)")
    ax.set_ylabel("PSNR to the teacher's image (dB, higher is closer)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"Closeness to the teacher vs cost — {result['config']['samples']} samples per method, 95% intervals",
                 fontsize=10)
    save_figure(path, fig)
    plt.close(fig)
    return path


def save_comparison_grid(runs, path: Path, per_row: int = 12) -> Path:
    """One row per method, the same initial noise in each column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..grids import grid_array

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
