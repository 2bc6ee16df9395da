"""Is the fitness sound? Rank correlation of the cheap proxies with the real FID over many candidates."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..anatomy import noise_shape
from ..cost import measure_step_costs
from ..errors import FlexdiffError
from ..io import read_json, save_figure, write_json, write_text
from ..metrics import QualityMeter
from ..models import LoadedModel
from ..sampling import initial_noise, sample
from ..schedule import Schedule
from .fitness import Fitness
from .space import SegmentSpace


def spread_candidates(space: SegmentSpace, costs, teacher_macs: float, n: int, seed: int) -> list[Schedule]:
    """`n` distinct schedules spread over the space: budgets from 1/30 to 1/2 of the teacher, log-spaced."""
    rng = np.random.default_rng(seed)
    out, keys = [], set()
    budgets = np.geomspace(1 / 30, 1 / 2, n)
    tries = 0
    while len(out) < n and tries < 100 * n:
        b = budgets[len(out)]
        g = space.repair(space.random(rng), costs, b * teacher_macs, rng)
        tries += 1
        if g is None:
            continue
        s = space.to_schedule(g)
        if s.key() not in keys:
            keys.add(s.key())
            out.append(s)
    return out


def search_candidates(folder: Path, n: int, model_fingerprint: str) -> list[Schedule]:
    """`n` of the schedules a finished (or running) search scored, at evenly spaced ranks of its fitness: the
    comparisons the search actually made, all within its budget."""
    from .evolution import STATE_FILE
    from .space import space_from_dict

    path = Path(folder) / STATE_FILE
    if not path.exists():
        raise FlexdiffError(f"--from-search {folder}: no {STATE_FILE} there (give a search's --out folder)")
    state = read_json(path, "a search state")
    try:
        space = space_from_dict(state["identity"]["space"])
        scored = sorted(state["evaluated"].items(), key=lambda kv: (kv[1]["fitness"], kv[0]))
    except (KeyError, TypeError, AttributeError) as e:
        raise FlexdiffError(f"{path}: damaged search state ({e!r} missing or of the wrong type)") from None
    if state["identity"].get("model") not in (None, model_fingerprint):
        raise FlexdiffError(f"--from-search {folder}: that search ran on another model (weights fingerprint "
                            f"{state['identity']['model']}, this model {model_fingerprint}); give the same --model")
    if len(scored) < 3:
        raise FlexdiffError(f"--from-search {folder}: {len(scored)} scored candidates there; need at least 3")
    ranks = sorted({int(i) for i in np.linspace(0, len(scored) - 1, min(n, len(scored))).round()})
    try:
        return [space.to_schedule(scored[i][1]["genome"]) for i in ranks]
    except (KeyError, TypeError, IndexError) as e:
        raise FlexdiffError(f"{path}: damaged search state (a scored candidate's genome: {e!r})") from None


def proxy_study(model: LoadedModel, meter: QualityMeter, out_dir: Path, candidates: int = 24,
                eval_samples: int = 256, fid_samples: int = 1000, seed: int = 0, space: SegmentSpace | None = None,
                progress=None, schedules: list[Schedule] | None = None, source: str = "spread") -> dict:
    """`schedules`: the candidates to rank (default: `candidates` spread over `space`); `source` says where from."""
    from scipy.stats import spearmanr

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    space = space or SegmentSpace()
    costs = measure_step_costs(model.unet)
    teacher = Schedule.teacher(model.scheduler_config, 100)
    teacher_macs = costs.schedule_macs(teacher)
    schedules = schedules or spread_candidates(space, costs, teacher_macs, candidates, seed)
    # the raw proxies are what is studied here: no class-mix guard on top (docs/metrics.md)
    proxy = Fitness(model, meter, teacher, "rfid", eval_samples, seed + 10_000, out_dir, progress=progress,
                    class_guard=False)
    big_noise = initial_noise(fid_samples, noise_shape(model.unet), seed)
    task = progress.add_task("proxy study", total=len(schedules)) if progress else None
    rows = []
    for s in schedules:
        t0 = time.perf_counter()
        feats = proxy.features(s)
        t_feat = time.perf_counter() - t0
        t1 = time.perf_counter()
        rfid = proxy.score(feats, "rfid")
        t_rfid = time.perf_counter() - t1 + t_feat
        t1 = time.perf_counter()
        dist = proxy.score(feats, "distance")
        t_dist = time.perf_counter() - t1 + t_feat
        t2 = time.perf_counter()
        imgs = sample(model.unet, model.scheduler_config, s, big_noise, progress=progress, description="real FID").images
        real = meter.quality(meter.features(imgs))
        t_real = time.perf_counter() - t2
        rows.append(dict(schedule=s.to_dict(), macs=costs.schedule_macs(s), rfid=rfid, distance=dist,
                         real_fid=real, seconds=dict(rfid=t_rfid, distance=t_dist, real_fid=t_real)))
        if task is not None:
            progress.update(task, advance=1)
    real = [r["real_fid"] for r in rows]
    res = dict(
        candidates=len(rows), source=source, eval_samples=eval_samples, fid_samples=fid_samples, seed=seed,
        real_metric=meter.headline,  # the quality against real data ("real_fid" in the rows): cbFD on the digits
        spearman=dict(rfid=float(spearmanr([r["rfid"] for r in rows], real)[0]),
                      distance=float(spearmanr([r["distance"] for r in rows], real)[0])),
        mean_seconds={k: float(np.mean([r["seconds"][k] for r in rows])) for k in ("rfid", "distance", "real_fid")},
        rows=rows,
    )
    res["time_saving"] = {k: 1 - res["mean_seconds"][k] / res["mean_seconds"]["real_fid"] for k in ("rfid", "distance")}
    write_json(out_dir / "proxy.json", res)
    write_text(out_dir / "proxy.md", proxy_table(res))
    _plot(res, out_dir / "proxy.png")
    return res


def _real_label(res: dict) -> str:
    return {"cbfd": "real cbFD", "fid": "real FID"}.get(res.get("real_metric", "fid"), "real FID")


def proxy_table(res: dict) -> str:
    ms, real = res["mean_seconds"], _real_label(res)
    where = "spread over the space" if res.get("source", "spread") == "spread" else f"scored by the search in {res['source']}"
    return "\n".join([
        f"{res['candidates']} candidates {where}; proxies on {res['eval_samples']} samples, {real} on "
        f"{res['fid_samples']} samples against the real digits (same noise for every candidate).",
        "",
        f"| fitness | Spearman ρ with {real} | mean seconds per candidate | time saved vs {real} |",
        "|---|---|---|---|",
        f"| rFID (vs teacher) | {res['spearman']['rfid']:.3f} | {ms['rfid']:.1f} | {100 * res['time_saving']['rfid']:.0f}% |",
        f"| per-sample distance | {res['spearman']['distance']:.3f} | {ms['distance']:.1f} | {100 * res['time_saving']['distance']:.0f}% |",
        f"| {real} | 1 | {ms['real_fid']:.1f} | — |",
    ]) + "\n"


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    real = [r["real_fid"] for r in res["rows"]]
    for ax, key, label in ((axes[0], "rfid", "rFID vs teacher"), (axes[1], "distance", "per-sample distance")):
        ax.scatter([r[key] for r in res["rows"]], real, s=18)
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} ({res['eval_samples']} samples)")
        ax.set_ylabel(f"{_real_label(res)} ({res['fid_samples']} samples)")
        ax.set_title(f"Spearman ρ = {res['spearman'][key]:.3f}")
        ax.grid(alpha=0.3)
    save_figure(path, fig)
    plt.close(fig)
