"""Who scores a search's candidates: this process, or a pool of Ray actors that each hold the
model, the meter and the teacher's features once and score candidates on the same fixed noise.

Either way a scorer hands back (fitness, seconds, worker) per candidate, in the candidates'
order, and reports each one as it lands so the driver can checkpoint it at once.
"""

from __future__ import annotations

from typing import Callable

from ..parallel import SERIAL, ActorPool, Workers, set_worker_threads, worker_name
from ..schedule import Schedule

Scored = tuple[float, float, str]  # fitness, seconds spent scoring, the worker that scored it


class FitnessWorker:
    """A Ray actor: builds the fitness once, then scores schedules sent as dicts."""

    def __init__(self, model, meter, fitness_args: dict, threads: int, gpus: float):
        import torch

        from .fitness import Fitness

        set_worker_threads(threads)
        if gpus and torch.cuda.is_available():
            model.unet.to("cuda")
        self.fitness = Fitness(model, meter, **fitness_args)
        self.name = worker_name()

    def score(self, schedule: dict) -> Scored:
        value, seconds = self.fitness(Schedule.from_dict(schedule))
        return value, seconds, self.name


class Scorer:
    """Scores schedules with `fitness` here, or on `workers` (a pool started on first use)."""

    def __init__(self, fitness, workers: Workers = SERIAL):
        self.fitness, self.workers = fitness, workers
        self.pool: ActorPool | None = None

    def __call__(self, schedules: list[Schedule], on_result: Callable[[int, Scored], None]) -> list[Scored]:
        if not self.workers.parallel:
            out = []
            for i, s in enumerate(schedules):
                value, seconds = self.fitness(s)
                out.append((value, seconds, "local"))
                on_result(i, out[-1])
            return out
        if self.pool is None:
            f = self.fitness
            self.pool = ActorPool(self.workers, FitnessWorker, f.model, f.meter, f.worker_args(),
                                  self.workers.threads, self.workers.gpus)
        return self.pool.map("score", [s.to_dict() for s in schedules], on_result)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
