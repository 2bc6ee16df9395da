"""`flexdiff experts`: the whole DiffPruning pipeline, in stages that run alone and resume.

    out/intervals/                 similarity heat map, intervals.json               (stage "intervals")
    out/elastic/expert_k/          elastic fine-tuning checkpoint, elastic.safetensors (stage "elastic")
    out/budget-B/agent/            the routing agent: agent.pt, choice.json, agent.png (stage "agent")
    out/budget-B/final/expert_k/   final fine-tuning checkpoints                       (stage "final")
    out/budget-B/mixture/          the deployable mixture folder (experts + intervals + manifest)

The budget-independent stages are shared by every budget. Each stage writes its settings
beside its results and refuses to resume with other settings.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..cost import count_macs, measure_latency, timing_machine
from ..devices import placement
from ..errors import FlexdiffError
from ..fingerprints import data_fingerprint, weights_fingerprint
from ..io import load_weights, read_json, save_safetensors, write_json
from ..mixture import Intervals, is_mixture, save_mixture
from ..models import LoadedModel
from ..parallel import SERIAL, Workers, run_tasks
from ..samplers import sampler_timesteps
from ..schedule import Schedule
from .agent import AgentConfig, SpecSpace, check_budget, train_agent
from .config import BUDGET_KINDS, STAGES, ExpertsConfig, guard  # noqa: F401 (re-exported: callers import them here)
from .elastic import ElasticUNet, SubnetSpec, make_elastic
from .finetune import IntervalBatches, TuneConfig
from .intervals import find_intervals, similarity_images
from .jobs import tune_elastic_job, tune_static_job


def training_data(model: LoadedModel, images: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images to fine-tune on, and their class labels for a class-conditional model.

    The given images, or the digits (train split, with labels) for digits-shaped models. A
    class-conditional model needs labelled data, which only the digits provide here.
    """
    from ..sampling import num_classes

    classes = num_classes(model.unet)
    if images is not None:
        if classes is not None:
            raise FlexdiffError("this model is class-conditional: --data images carry no labels (only the built-in "
                                "digits do)")
        return images, None
    from ..anatomy import noise_shape
    from ..data import load_digits_split

    if noise_shape(model.unet) != (1, 16, 16):
        raise FlexdiffError("this model is not the digits default: pass its training images (--data)")
    images, labels = load_digits_split("train")
    return images, (labels if classes is not None else None)


def training_images(model: LoadedModel, images: torch.Tensor | None) -> torch.Tensor:
    return training_data(model, images)[0]


class ExpertsPipeline:
    def __init__(self, model: LoadedModel, out_dir: Path, cfg: ExpertsConfig = ExpertsConfig(),
                 images: torch.Tensor | None = None, progress=None, workers: Workers = SERIAL):
        if model.is_conditional:
            raise FlexdiffError("flexdiff experts trains on images only: conditional UNets need their "
                                "conditioning data, which this pipeline does not load")
        if is_mixture(model.unet):
            raise FlexdiffError(f"--model {model.path} is already a mixture; give the teacher UNet")
        from ..samplers import check_sampler_fits

        check_sampler_fits(cfg.sampler, model.scheduler_config, "the experts' sampler (--sampler)")
        self.model, self.cfg, self.progress = model, cfg, progress
        self.workers = workers  # where the per-interval fine-tunings run; the agent stays here
        self.out = Path(out_dir)
        self.images, self.labels = training_data(model, images)
        self.teacher = model.unet.eval().requires_grad_(False)
        # what every stage is built from: a folder made from another model or other data is refused
        self.identity = dict(model=weights_fingerprint(self.teacher), data=data_fingerprint(self.images, self.labels))
        self._macs: dict[SubnetSpec, float] = {}
        # each stage's result, handed to the stages after it within this run (computed or loaded once)
        self._intervals: Intervals | None = None
        self._elastics: list[ElasticUNet] | None = None

    # ---- paths
    def budget_dir(self, budget: float | None = None) -> Path:
        # a latency budget gets its own folder: the MACs and the latency mixture at one budget side by side
        kind = "" if self.cfg.budget_kind == "macs" else f"-{self.cfg.budget_kind}"
        return self.out / f"budget-{(budget if budget is not None else self.cfg.budget):g}{kind}"

    # ---- stage 1
    def intervals(self) -> Intervals:
        if self._intervals is None:
            self._intervals = self._find_intervals()
        return self._intervals

    def _find_intervals(self) -> Intervals:
        folder = self.out / "intervals"
        folder.mkdir(parents=True, exist_ok=True)
        guard(folder, {**self.identity, **self.cfg.stage_settings("intervals")})
        if (folder / "intervals.json").exists():
            return Intervals.load(folder / "intervals.json")
        imgs = similarity_images(self.images, self.cfg.sim_images, self.cfg.seed)
        return find_intervals(self.teacher, imgs, self.model.scheduler_config, folder, self.cfg.sim_timesteps,
                              self.cfg.measure, self.cfg.k, self.cfg.k_max, self.cfg.seed, self.progress)

    def batches(self, lo: int, hi: int) -> IntervalBatches:
        from ..conditioning import class_spec

        return IntervalBatches(self.images, self.model.scheduler_config, lo, hi, teacher=self.teacher,
                               labels=self.labels, classes=class_spec(self.teacher) if self.labels is not None else None)

    def tune_config(self, steps: int, seed_offset: int) -> TuneConfig:
        c = self.cfg
        return TuneConfig(steps=steps, batch_size=c.batch_size, lr=c.lr, distill=c.distill, seed=c.seed + seed_offset)

    # ---- stage 2
    def elastic_experts(self) -> list[ElasticUNet]:
        if self._elastics is None:
            self._elastics = self._tune_elastic_experts()
        return self._elastics

    def _tune_elastic_experts(self) -> list[ElasticUNet]:
        iv = self.intervals()
        folder = self.out / "elastic"
        folder.mkdir(parents=True, exist_ok=True)
        guard(folder, {**self.identity, **self.cfg.stage_settings("elastic")})
        out: list[ElasticUNet | None] = []
        for k in range(iv.k):
            done = folder / f"expert_{k}" / "elastic.safetensors"
            summary = done.parent / "summary.json"
            out.append(self._elastic_from(load_weights(done), read_json(summary, "the elastic expert's summary")
                                          .get("elastic", {}), summary) if done.exists() else None)
        pending = [k for k, e in enumerate(out) if e is None]
        jobs = [dict(teacher=self.teacher, batches=self.batches(*iv.bounds()[k]),
                     cfg=self.tune_config(self.cfg.elastic_steps, k), importance_batches=self.cfg.importance_batches,
                     importance_seed=self.cfg.seed + k, checkpoint=folder / f"expert_{k}" / "checkpoint.pt",
                     description="elastic expert {} [{}, {}]".format(k, *iv.bounds()[k])) for k in pending]

        def store(i: int, result) -> None:
            d = folder / f"expert_{pending[i]}"
            state, summary = result
            write_json(d / "summary.json", summary)
            save_safetensors(d / "elastic.safetensors", state)
            (d / "checkpoint.pt").unlink(missing_ok=True)
            out[pending[i]] = self._elastic_from(state, summary.get("elastic", {}))

        self._run_jobs(tune_elastic_job, jobs, store, "elastic experts")
        return out

    def _elastic_from(self, state: dict, extra: dict, where: Path | None = None) -> ElasticUNet:
        """An elastic expert from its stored weights and what else it needs (a transformer: its blocks' order, kept
        in `where`, the expert's summary.json, named in an error)."""
        elastic = make_elastic(copy.deepcopy(self.teacher))
        elastic.unet.load_state_dict(state)
        try:
            elastic.load_extra_state(extra)
        except FlexdiffError as e:
            raise FlexdiffError(f"{where}: {e}" if where is not None else str(e)) from None
        return elastic

    def _run_jobs(self, fn, jobs: list[dict], store, what: str) -> None:
        """Run per-interval jobs here, one after the other, or as Ray tasks on the workers; `store`
        keeps each result as it lands (so a killed driver loses only the jobs still running)."""
        if not self.workers.parallel:
            for i, job in enumerate(jobs):
                store(i, fn(**job, progress=self.progress))
            return
        task = self.progress.add_task(f"{what}: {len(jobs)} fine-tunings on Ray workers", total=len(jobs)) \
            if self.progress and jobs else None

        def landed(i: int, result) -> None:
            store(i, result)
            if task is not None:
                self.progress.update(task, advance=1)

        run_tasks(self.workers, fn, [dict(job, threads=self.workers.threads) for job in jobs], landed)
        if task is not None:
            self.progress.remove_task(task)

    def served(self, iv: Intervals) -> list[int]:
        run = Schedule.full(self.cfg.sampler, self.cfg.num_steps)
        return iv.steps_served(sampler_timesteps(run, self.model.scheduler_config))

    def spec_macs(self, elastic: ElasticUNet, spec: SubnetSpec) -> float:
        """MACs of one call of a sub-network (counted once per spec: they do not depend on the weights)."""
        if spec not in self._macs:
            self._macs[spec] = count_macs(elastic.template(spec))
        return self._macs[spec]

    def spec_latency(self, elastic: ElasticUNet, spec: SubnetSpec) -> float:
        """Seconds per image of one call of a sub-network on this machine, measured once and kept in a table
        (`out/latency/`, one per machine, thread count and batch)."""
        import json

        f = self.out / "latency" / f"{timing_machine(*placement(self.teacher))}-b{self.cfg.latency_batch}.json"
        if not hasattr(self, "_latency"):
            self._latency = read_json(f, "the latency table") if f.exists() else {}
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if key not in self._latency:
            self._latency[key] = measure_latency(elastic.template(spec), self.cfg.latency_batch)
            f.parent.mkdir(parents=True, exist_ok=True)
            write_json(f, self._latency)
        return self._latency[key]

    def spec_cost(self, elastic: ElasticUNet, spec: SubnetSpec) -> float:
        """What the budget counts for one call of a sub-network (--budget-kind)."""
        if self.cfg.budget_kind == "latency":
            return self.spec_latency(elastic, spec)
        return self.spec_macs(elastic, spec)

    def spec_space(self, elastic: ElasticUNet) -> SpecSpace:
        return SpecSpace(elastic, lambda spec: self.spec_cost(elastic, spec))

    # ---- stage 3
    def agent(self, budget: float | None = None) -> dict:
        budget = self.cfg.budget if budget is None else budget
        cfg = replace(self.cfg, budget=budget)
        iv = self.intervals()
        served = self.served(iv)
        elastics = self.elastic_experts() if not self._agent_done(budget) else None
        folder = self.budget_dir(budget) / "agent"
        folder.mkdir(parents=True, exist_ok=True)
        guard(folder, {**self.identity, **cfg.stage_settings("agent")})
        if self._agent_done(budget):
            return read_json(folder / "choice.json", "the agent's choice")
        space = [self.spec_space(e) for e in elastics]  # each expert's own (a transformer's: its blocks' order)
        batches = [self.batches(lo, hi) for lo, hi in iv.bounds()]
        acfg = AgentConfig(steps=self.cfg.agent_steps, batch_size=self.cfg.batch_size, distill=self.cfg.distill,
                           score=self.cfg.agent_score, spend=self.cfg.agent_spend, seed=self.cfg.seed)
        result = train_agent(elastics, batches, space, served, budget, folder, acfg, self.progress,
                             "latency on this machine" if self.cfg.budget_kind == "latency" else "MACs")
        (folder / "agent.pt").unlink(missing_ok=True)
        return result

    def _agent_done(self, budget: float) -> bool:
        return (self.budget_dir(budget) / "agent" / "choice.json").exists()

    def check_budget(self, budget: float | None = None) -> None:
        """Refuse an impossible budget before any training (uses only the model's shape)."""
        budget = self.cfg.budget if budget is None else budget
        iv_file = self.out / "intervals" / "intervals.json"
        served = self.served(Intervals.load(iv_file)) if iv_file.exists() else [self.cfg.num_steps]
        space = self.spec_space(make_elastic(self.teacher))  # reads shapes only: no copy
        check_budget(space, served, budget, space.full_cost * sum(served),
                     "latency on this machine" if self.cfg.budget_kind == "latency" else "MACs")

    # ---- stage 4
    def final(self, budget: float | None = None, specs: list[SubnetSpec] | None = None,
              name: str = "mixture", info: dict | None = None) -> Path:
        """Extract the chosen sub-networks, fine-tune each on its interval, save the mixture folder."""
        budget = self.cfg.budget if budget is None else budget
        cfg = replace(self.cfg, budget=budget)
        target = self.budget_dir(budget) / name
        iv = self.intervals()
        choice = self.agent(budget)
        if specs is None:
            specs = [SubnetSpec.from_dict(e["spec"]) for e in choice["experts"]]
        folder = self.budget_dir(budget) / ("final" if name == "mixture" else f"final-{name}")
        folder.mkdir(parents=True, exist_ok=True)
        # checked before a finished mixture is returned: one tuned for other steps is not this one
        guard(folder, {**self.identity, **cfg.stage_settings("final"), "specs": [s.to_dict() for s in specs]})
        if (target / "mixture.json").exists():
            return target
        elastics = self.elastic_experts()
        experts = [elastic.extract(spec) for spec, elastic in zip(specs, elastics)]
        jobs = [dict(model=experts[k], batches=self.batches(lo, hi), cfg=self.tune_config(self.cfg.final_steps, 100 + k),
                     checkpoint=folder / f"expert_{k}" / "checkpoint.pt", description=f"{name} expert {k} [{lo}, {hi}]")
                for k, (lo, hi) in enumerate(iv.bounds())]

        def store(k: int, result) -> None:
            state, summary = result
            experts[k].load_state_dict(state)  # a worker's copy was tuned; here, the same object already is
            write_json(folder / f"expert_{k}" / "summary.json", summary)

        self._run_jobs(tune_static_job, jobs, store, f"{name} experts")
        served = self.served(iv)
        teacher_call = count_macs(self.teacher)
        calls = [count_macs(m) for m in experts]
        run = sum(c * s for c, s in zip(calls, served))
        info = dict(budget=budget, budget_kind=self.cfg.budget_kind, sampler=self.cfg.sampler, num_steps=self.cfg.num_steps, steps_served=served,
                    macs_per_call=calls, teacher_macs_per_call=teacher_call,
                    fraction_of_teacher=run / (teacher_call * sum(served)), settings=asdict(cfg), **(info or {}))
        # the experts make latents: the mixture keeps a copy of this pipeline's decoder (and encoders) inside it
        save_mixture(experts, iv, specs, self.model.scheduler_config, target, info,
                     pipeline=Path(self.model.path) if self.model.is_latent else None)
        for k in range(len(experts)):
            (folder / f"expert_{k}" / "checkpoint.pt").unlink(missing_ok=True)
        return target

    def run(self, stages: tuple[str, ...] = STAGES) -> Path | None:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise FlexdiffError(f"unknown stage {unknown[0]!r}; accepted: {', '.join(STAGES)}")
        self.check_budget()
        result = None
        for s in stages:
            if s == "intervals":
                self.intervals()
            elif s == "elastic":
                self.elastic_experts()
            elif s == "agent":
                self.agent()
            elif s == "final":
                result = self.final()
        # the record of the last run that went through: written after the stages' guards accepted the settings,
        # so a refused run leaves it as it was
        write_json(self.out / "experts_config.json", asdict(self.cfg))
        return result
