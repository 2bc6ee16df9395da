"""The baselines a mixture of experts is measured against, at the same MACs and the same training steps.

- uniform-width experts: the same intervals and training, but one width fraction for every
  expert instead of the agent's choice;
- one static pruned model for all timesteps, fine-tuned for as many steps as all the experts together: for a
  UNet Diff-Pruning-style (Fang et al. NeurIPS 2023: Taylor channel importance over all timesteps, one width
  fraction); for a transformer TinyFusion-style (Fang et al. CVPR 2025: whole blocks dropped, here in the order
  scored over all timesteps, at full width).
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..cost import count_macs
from ..errors import FlexdiffError
from ..io import read_json, write_json
from ..models import save_model
from ..samplers import num_train_timesteps
from .elastic import ElasticUNet, SubnetSpec, make_elastic, uniform_width
from .finetune import taylor_importance, tune_static
from .pipeline import ExpertsPipeline, guard


def uniform_specs(pipe: ExpertsPipeline, elastic: ElasticUNet, run_macs: float, served: list[int],
                  candidates: list[SubnetSpec] | None = None) -> SubnetSpec:
    """Among `candidates` (default: one width fraction everywhere, full depth), the one whose run's MACs are
    closest to `run_macs`.

    The sub-networks come in discrete sizes, so the baseline may get slightly more or less than
    the mixture; the bench reports every method's own MACs.
    """
    best = None
    for spec in uniform_width(elastic) if candidates is None else candidates:
        m = pipe.spec_macs(elastic, spec) * sum(served)
        key = (abs(m - run_macs), m)
        if best is None or key < best[0]:
            best = (key, spec)
    if best is None:
        raise FlexdiffError(f"no uniform-width sub-network for {run_macs / 1e6:,.0f} M MACs per run")
    return best[1]

def uniform_experts(pipe: ExpertsPipeline, budget: float | None = None) -> Path:
    """The experts without the agent: the same width everywhere, at (at most) the mixture's MACs."""
    budget = pipe.cfg.budget if budget is None else budget
    mix = read_json(pipe.final(budget) / "mixture.json", "the mixture manifest")
    served = mix["steps_served"]
    run = sum(c * s for c, s in zip(mix["macs_per_call"], served))
    elastic = pipe.elastic_experts()[0]
    spec = uniform_specs(pipe, elastic, run, served)
    return pipe.final(budget, [spec] * len(served), name="uniform", info=dict(baseline="uniform width"))

def pruned_baseline(pipe: ExpertsPipeline, budget: float | None = None) -> Path:
    """One statically pruned model for all timesteps (a UNet: Diff-Pruning-style channels; a transformer:
    TinyFusion-style blocks), importance over all timesteps, same MACs, same steps."""
    budget = pipe.cfg.budget if budget is None else budget
    target = pipe.budget_dir(budget) / "pruned"
    folder = pipe.budget_dir(budget) / "pruned-training"
    mix = read_json(pipe.final(budget) / "mixture.json", "the mixture manifest")
    served = mix["steps_served"]
    steps = len(served) * (pipe.cfg.elastic_steps + pipe.cfg.final_steps)  # the experts' total
    settings = {**pipe.identity, **pipe.cfg.stage_settings("final"), "steps": steps}
    folder.mkdir(parents=True, exist_ok=True)
    if (target / "pruning.json").exists():  # written last: the folder is complete, but maybe for other settings
        done = read_json(target / "pruning.json", "the pruned model's record")
        guard(folder, {**settings, "spec": done.get("spec")})
        return target
    run = sum(c * s for c, s in zip(mix["macs_per_call"], served))
    T = num_train_timesteps(pipe.model.scheduler_config)
    elastic = make_elastic(copy.deepcopy(pipe.teacher))
    all_t = pipe.batches(0, T - 1)
    elastic.apply_importance(*taylor_importance(elastic, all_t, pipe.cfg.importance_batches, pipe.cfg.batch_size,
                                                seed=pipe.cfg.seed))
    spec = uniform_specs(pipe, elastic, run, served, elastic.static_specs())
    model = elastic.extract(spec)
    guard(folder, {**settings, "spec": spec.to_dict()})
    summary = tune_static(model, all_t, folder / "checkpoint.pt", pipe.tune_config(steps, 1000), pipe.progress,
                          "Diff-Pruning baseline")

    save_model(model, pipe.model.scheduler_config, target)
    write_json(target / "pruning.json", dict(spec=spec.to_dict(), steps=steps, summary=summary,
                                              macs_per_call=count_macs(model)))
    (folder / "checkpoint.pt").unlink(missing_ok=True)
    return target
