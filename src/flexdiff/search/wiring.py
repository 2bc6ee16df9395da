"""Wiring a search to a model: its step costs, weights fingerprint, teacher (or reference) and fitness."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..cost import StepCosts
from ..errors import FlexdiffError
from ..parallel import SERIAL, Workers
from ..schedule import Schedule
from .evolution import Search, SearchConfig


def search_from_settings(model, meter, space, cfg: SearchConfig, out_dir: Path, progress=None,
                         batch_size: int = 256, teacher_cache: Path | None = None,
                         costs: StepCosts | None = None, model_fingerprint: str | None = None,
                         workers: Workers = SERIAL, reference=None, reference_cache: Path | None = None) -> Search:
    """Wire a search to a model: step costs and weights fingerprint (computed unless given), the teacher, the
    fitness on fixed noise.

    `reference`: another model (the original teacher of a pruned model or a mixture of experts) whose DDIM run
    the candidates are scored against, drawn on the same noise (its features kept in `reference_cache`);
    by default the searched model's own DDIM run is the teacher. The settings are checked before the
    teacher's samples are drawn, the slow part of the set-up."""
    from ..cost import measure_step_costs
    from .fitness import Fitness

    costs = costs or measure_step_costs(model.unet, guidance=cfg.guidance != 1.0,
                                        cross_attention_len=getattr(model, "cross_attention_len", 77))
    space.validate(len(costs.partial))
    if getattr(meter, "name", None) == "pixels" and cfg.metric != "distance":
        raise FlexdiffError(f"--metric {cfg.metric}: without real images (--real-data) this model is scored against "
                            "the teacher only; use --metric distance")
    from ..fingerprints import weights_fingerprint

    teacher = Schedule.teacher(model.scheduler_config, cfg.teacher_steps)
    out_dir = Path(out_dir)
    if reference is not None:
        if cfg.metric == "fid":
            raise FlexdiffError("--metric fid scores against the real data, not a reference model's samples; "
                                "use rfid or distance with a reference")
        from ..anatomy import noise_shape

        ref_shape, own_shape = (noise_shape(m.unet) for m in (reference, model))  # (C, H, W), UNet or transformer
        if ref_shape != own_shape:
            raise FlexdiffError(f"the reference model {reference.path} makes samples of another shape "
                                f"({ref_shape[0]} channels at {ref_shape[1]}) than the searched one")
    search = Search(space, costs, costs.schedule_macs(teacher), None, cfg, out_dir, progress,
                    model_fingerprint=model_fingerprint or weights_fingerprint(model.unet), workers=workers,
                    reference_fingerprint=None if reference is None else weights_fingerprint(reference.unet),
                    runs_on=_runs_on(model.unet))
    # refused before the teacher runs (the slow part): an impossible budget, a damaged or foreign state
    search._initial(np.random.default_rng(cfg.seed))
    search._load_state()
    out_dir.mkdir(parents=True, exist_ok=True)
    common = dict(batch_size=batch_size, progress=progress, labels=cfg.labels, guidance=cfg.guidance,
                  prompts=cfg.prompts, negative_prompt=cfg.negative_prompt, class_guard=cfg.class_guard)
    reference_features = None
    if reference is not None:  # the reference's teacher run on the search's noise (the same seed and conditioning)
        reference_features = Fitness(reference, meter, teacher, cfg.metric, cfg.eval_samples, cfg.seed + 10_000,
                                     reference_cache or out_dir / "reference", **common).teacher
    search.fitness = Fitness(model, meter, teacher, cfg.metric, cfg.eval_samples, cfg.seed + 10_000,
                             teacher_cache or out_dir, teacher_features=reference_features, **common)
    return search


def _runs_on(unet) -> str | None:
    """'cuda-bfloat16' and the like: part of a search's identity, except on the CPU in float32 (left out, so
    the states saved before devices were an option still resume)."""
    from ..devices import CPU_FLOAT32, placement, runs_on

    tag = runs_on(*placement(unet))
    return None if tag == CPU_FLOAT32 else tag


__all__ = ["search_from_settings"]
