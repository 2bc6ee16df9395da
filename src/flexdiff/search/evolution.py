"""Evolutionary search over schedules: seeded, budget-constrained, cached, resumable.

Single objective: minimise the fitness (rFID to the teacher's samples by default) under a MACs budget; candidates over
the budget are repaired (see the space's `repair`). Pareto mode: NSGA-II selection (non-
dominated sorting and crowding distance from pymoo) on (fitness, MACs), returning the front.
After every generation the whole state (population, RNG, scored candidates, history) is
written atomically; the same command started again continues where it stopped and ends with
the result an uninterrupted run gives.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..configs import Config
from ..cost import StepCosts
from ..errors import FlexdiffError
from ..io import write_json
from ..parallel import SERIAL, Workers
from ..schedule import Schedule
from .plot import plot_search
from .workers import Scorer

STATE_FILE = "search_state.json"

@dataclass(frozen=True)
class SearchConfig(Config):
    budget: float | None = 1 / 16  # max MACs as a fraction of the teacher's; None only with pareto
    pareto: bool = False
    population: int = 16
    generations: int = 10
    eval_samples: int = 256
    # measured: among the candidates a search compares, rFID ranks like the real metric best (docs/search.md);
    # a model without real data (the pixel meter) is scored by the per-sample distance instead
    metric: str = "rfid"
    seed: int = 0
    crossover_rate: float = 0.7
    teacher_steps: int = 100
    labels: tuple[int, ...] = ()  # class-conditional models: sample labels (cycled); () = unconditional
    guidance: float = 1.0  # classifier-free guidance scale of the teacher and every candidate
    prompts: tuple[str, ...] = ()  # text-to-image pipelines: the fixed prompts (cycled); () = the empty prompt
    negative_prompt: str | None = None
    # a candidate whose class mix is separated worse than the teacher's ranks last (digits classifier space only)
    class_guard: bool = True

    def check(self) -> None:
        if self.budget is None and not self.pareto:
            raise FlexdiffError("give --budget or --speedup (or use --pareto)")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise FlexdiffError(f"--budget {self.budget}: must be a fraction of the teacher's MACs in (0, 1]")
        if self.population < 2:
            raise FlexdiffError(f"--population {self.population}: need at least 2")
        if self.generations < 0:
            raise FlexdiffError(f"--generations {self.generations}: must be >= 0")
        from .fitness import METRICS

        if self.metric not in METRICS:
            raise FlexdiffError(f"--metric {self.metric!r}: accepted values are {', '.join(METRICS)}")
        if self.eval_samples < 8:
            raise FlexdiffError(f"--eval-samples {self.eval_samples}: need at least 8 for a covariance")


@dataclass
class SearchResult:
    best: Schedule
    front: list[Schedule]
    history: list[dict]
    evaluated: dict[str, dict]
    seconds: float


def _rank_and_crowding(objs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from pymoo.operators.survival.rank_and_crowding.metrics import calc_crowding_distance
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    rank = np.zeros(len(objs), int)
    crowd = np.zeros(len(objs))
    for r, front in enumerate(NonDominatedSorting().do(objs)):
        rank[front] = r
        crowd[front] = calc_crowding_distance(objs[front]) if len(front) > 2 else np.inf
    return rank, crowd


class Search:
    def __init__(self, space, costs: StepCosts, teacher_macs: float, fitness: Callable[[Schedule], tuple[float, float]],
                 cfg: SearchConfig, out_dir: Path, progress=None, model_fingerprint: str | None = None,
                 workers: Workers = SERIAL, reference_fingerprint: str | None = None, runs_on: str | None = None):
        self.space, self.costs, self.fitness, self.cfg = space, costs, fitness, cfg
        self.workers = workers  # not part of the identity: a parallel run resumes a serial one and vice versa
        self.teacher_macs = teacher_macs
        self.budget_macs = (cfg.budget if cfg.budget is not None else 1.0) * teacher_macs
        self.out_dir = Path(out_dir)
        self.progress = progress
        config = asdict(cfg)
        for name in ("prompts", "negative_prompt"):  # unset: left out, so searches saved before they existed resume
            if not config[name]:
                config.pop(name)
        self.identity = dict(config=config, space=space.to_dict())
        if model_fingerprint is not None:  # what the search runs on, not only its settings
            self.identity["model"] = model_fingerprint
        if reference_fingerprint is not None:  # scored against another model's teacher run (left out otherwise)
            self.identity["reference"] = reference_fingerprint
        if runs_on is not None:  # the device type and dtype, where not the CPU in float32 (older states resume)
            self.identity["runs_on"] = runs_on

    # --- state --------------------------------------------------------------------------
    def _fresh_state(self) -> dict:
        return dict(identity=self.identity, generation=-1, rng=None, population=[], evaluated={},
                    history=[], seconds=0.0)

    def _load_state(self) -> dict:
        path = self.out_dir / STATE_FILE
        if not path.exists():
            return self._fresh_state()
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FlexdiffError(f"{path}: damaged search state ({e}); remove it to start again") from None
        if not isinstance(state, dict) or not isinstance(state.get("identity"), dict):
            raise FlexdiffError(f"{path}: damaged search state (not a flexdiff search); remove it to start again")
        kinds = dict(generation=int, population=list, evaluated=dict, history=list, seconds=(int, float))
        wrong = [k for k, t in kinds.items() if not isinstance(state.get(k), t)]
        if wrong:
            raise FlexdiffError(f"{path}: damaged search state (field {wrong[0]!r} is missing or of the wrong type); "
                                "remove it to start again")
        if state["identity"].get("model") != self.identity.get("model"):
            raise FlexdiffError(f"{path}: a search on another model is stored here (weights fingerprint "
                                f"{state['identity'].get('model')}, now {self.identity.get('model')}); use another --out folder")
        if state.get("identity") != json.loads(json.dumps(self.identity)):
            raise FlexdiffError(
                f"{path}: a search with other settings is stored here; use the same settings to resume, "
                "or another --out folder"
            )
        return state

    def _save_state(self, state: dict) -> None:
        write_json(self.out_dir / STATE_FILE, state)

    # --- scoring ------------------------------------------------------------------------
    def _score(self, genomes: list[dict], state: dict, scorer: Scorer, task=None) -> list[dict]:
        gen = state["generation"] + 1
        keys = [self.space.to_schedule(g).key() for g in genomes]
        fresh = [i for i, k in enumerate(keys) if k not in state["evaluated"] and k not in keys[:i]]
        if task is not None:
            self.progress.update(task, advance=len(genomes) - len(fresh))  # scored before (or in a killed run)

        def record(j: int, result) -> None:
            i = fresh[j]
            value, seconds, worker = result
            state["evaluated"][keys[i]] = dict(fitness=value, macs=self.costs.schedule_macs(
                self.space.to_schedule(genomes[i])), seconds=seconds, worker=worker, generation=gen, genome=genomes[i])
            # Saved at once: the RNG state in the file is still the last finished generation's, so a
            # restarted run redraws this generation's candidates and finds these scores cached.
            self._save_state(state)
            if task is not None:
                self.progress.update(task, advance=1)

        scorer([self.space.to_schedule(genomes[i]) for i in fresh], record)
        return [dict(genome=g, key=k, fitness=state["evaluated"][k]["fitness"], macs=state["evaluated"][k]["macs"])
                for g, k in zip(genomes, keys)]

    def _select(self, members: list[dict]) -> list[dict]:
        """Keep the population's size: best fitness (ties: fewer MACs), or NSGA-II in pareto mode."""
        unique = list({m["key"]: m for m in members}.values())
        if not self.cfg.pareto:
            unique.sort(key=lambda m: (m["fitness"], m["macs"], m["key"]))
            return unique[: self.cfg.population]
        objs = np.array([[m["fitness"], m["macs"]] for m in unique])
        rank, crowd = _rank_and_crowding(objs)
        order = sorted(range(len(unique)), key=lambda i: (rank[i], -crowd[i], unique[i]["key"]))
        chosen = [dict(unique[i], rank=int(rank[i])) for i in order[: self.cfg.population]]
        return chosen

    def _better(self, a: dict, b: dict) -> bool:
        if self.cfg.pareto:
            return (a.get("rank", 0), a["fitness"]) < (b.get("rank", 0), b["fitness"])
        return (a["fitness"], a["macs"]) < (b["fitness"], b["macs"])

    def _tournament(self, pop: list[dict], rng) -> dict:
        a, b = (pop[int(i)] for i in rng.integers(len(pop), size=2))
        return a if self._better(a, b) else b

    # --- the loop -----------------------------------------------------------------------
    def _initial(self, rng) -> list[dict]:
        genomes, keys = [], set()

        def add(g):
            g = self.space.repair(g, self.costs, self.budget_macs, rng)
            if g is not None:
                k = self.space.to_schedule(g).key()
                if k not in keys:
                    keys.add(k)
                    genomes.append(g)

        for g in self.space.budget_seeds(self.costs, self.budget_macs):  # every search starts from "fewer steps"
            add(g)
        seeds = self.space.seeds()
        for i in rng.permutation(len(seeds))[: max(1, self.cfg.population // 2)]:
            add(seeds[int(i)])
        tries = 0
        while len(genomes) < self.cfg.population and tries < 50 * self.cfg.population:
            add(self.space.random(rng))
            tries += 1
        if not genomes:
            raise FlexdiffError(
                f"no schedule in the search space fits the budget ({self.budget_macs / 1e6:,.1f} M MACs per "
                f"image; one full step costs {self.costs.full / 1e6:,.1f} M): raise --budget or allow longer "
                "segments (--lengths) or fewer steps (--steps)"
            )
        return genomes

    def _offspring(self, pop: list[dict], rng) -> list[dict]:
        children, keys = [], {m["key"] for m in pop}
        tries = 0
        while len(children) < self.cfg.population and tries < 30 * self.cfg.population:
            tries += 1
            a, b = self._tournament(pop, rng), self._tournament(pop, rng)
            child = self.space.crossover(a["genome"], b["genome"], rng) if rng.random() < self.cfg.crossover_rate \
                else a["genome"]
            for _ in range(1 + int(rng.random() < 0.3)):
                child = self.space.mutate(child, rng)
            child = self.space.repair(child, self.costs, self.budget_macs, rng)
            if child is None:
                continue
            k = self.space.to_schedule(child).key()
            if k in keys:
                continue
            keys.add(k)
            children.append(child)
        return children

    def run(self, on_generation: Callable[[int], None] | None = None) -> SearchResult:
        scorer = Scorer(self.fitness, self.workers)
        try:
            return self._run(scorer, on_generation)
        finally:
            scorer.close()

    def _run(self, scorer: Scorer, on_generation: Callable[[int], None] | None) -> SearchResult:
        state = self._load_state()
        rng = np.random.default_rng(self.cfg.seed)
        if state["rng"] is not None:
            rng.bit_generator.state = state["rng"]
        t0 = time.perf_counter() - state["seconds"]
        total = self.cfg.generations + 1
        gen_task = self.progress.add_task("search: generations", total=total,
                                          completed=state["generation"] + 1) if self.progress else None
        while state["generation"] < self.cfg.generations:
            g = state["generation"] + 1
            genomes = self._initial(rng) if g == 0 else self._offspring(state["population"], rng)
            where = " on Ray workers" if self.workers.parallel else ""
            task = self.progress.add_task(f"generation {g}: scoring{where}", total=len(genomes)) if self.progress else None
            scored = self._score(genomes, state, scorer, task)
            if task is not None:
                self.progress.remove_task(task)
            state["population"] = self._select(state["population"] + scored)
            state["generation"] = g
            state["rng"] = rng.bit_generator.state
            state["seconds"] = time.perf_counter() - t0
            best = self._best(state["population"])
            fits = [m["fitness"] for m in state["population"]]
            state["history"].append(dict(
                generation=g, best_fitness=best["fitness"], best_macs=best["macs"],
                median_fitness=float(np.median(fits)), new_evaluations=sum(
                    1 for e in state["evaluated"].values() if e["generation"] == g),
                evaluated_total=len(state["evaluated"]), seconds=state["seconds"],
                scored=[dict(key=k, fitness=e["fitness"], macs=e["macs"], worker=e.get("worker", "local"),
                             seconds=e["seconds"]) for k, e in sorted(state["evaluated"].items()) if e["generation"] == g],
            ))
            self._save_state(state)
            if gen_task is not None:
                self.progress.update(gen_task, advance=1, description=(
                    f"search: gen {g} best {self.cfg.metric} {best['fitness']:.3f} at "
                    f"{self.teacher_macs / best['macs']:.1f}x"))
            if on_generation is not None:
                on_generation(g)
        return self._finish(state)

    def _best(self, pop: list[dict]) -> dict:
        return min(pop, key=lambda m: (m["fitness"], m["macs"], m["key"]))

    def _front(self, state: dict) -> list[dict]:
        """Non-dominated (fitness, MACs) points among everything scored, cheapest first."""
        # in key order: workers finish in any order, the front must not depend on it
        items = [dict(key=k, **state["evaluated"][k]) for k in sorted(state["evaluated"])
                 if state["evaluated"][k]["macs"] <= self.budget_macs]
        objs = np.array([[e["fitness"], e["macs"]] for e in items])
        from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

        first = NonDominatedSorting().do(objs, only_non_dominated_front=True)
        return sorted((items[i] for i in first), key=lambda e: e["macs"])

    def _schedule(self, genome: dict, name: str, fitness: float, macs: float) -> Schedule:
        s = self.space.to_schedule(genome)
        meta = dict(search=self.space.kind, metric=self.cfg.metric, fitness=fitness, macs_per_image=macs,
                    speedup_macs=self.teacher_macs / macs, budget=self.cfg.budget, genome=genome,
                    eval_samples=self.cfg.eval_samples, seed=self.cfg.seed)
        return replace(s, name=name, meta=meta)

    def _finish(self, state: dict) -> SearchResult:
        best_m = self._best(state["population"])
        label = "flexiffusion" if self.space.kind == "segment" else "autodiffusion"
        best = self._schedule(best_m["genome"], f"{label} {self.teacher_macs / best_m['macs']:.1f}x", best_m["fitness"],
                              best_m["macs"])
        front: list[Schedule] = []
        if self.cfg.pareto:
            front = [self._schedule(e["genome"], f"{label} front {self.teacher_macs / e['macs']:.1f}x",
                                    e["fitness"], e["macs"]) for e in self._front(state)]
            write_json(self.out_dir / "front.json", [s.to_dict() for s in front])
        best.save(self.out_dir / "best.json")
        write_json(self.out_dir / "history.json", state["history"])
        plot_search(self.out_dir / "search.png", state, best, front, self.cfg, self.teacher_macs)
        return SearchResult(best=best, front=front, history=state["history"], evaluated=state["evaluated"],
                            seconds=state["seconds"])


__all__ = ["Search", "SearchConfig", "SearchResult"]
