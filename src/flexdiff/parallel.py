"""Ray as the distributed engine (the optional `ray` extra): join or start a cluster, keep a pool
of actors busy, run independent tasks.

Results always come back keyed by the job's position, never by who finished first, so the
caller's bookkeeping (a search's history, the experts' folders) is the same as a serial run's.
Fault tolerance is Ray's: an actor whose process dies is restarted (its constructor runs again)
and the calls it held are retried; a task whose worker dies is retried.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import FlexdiffError

RAY_EXTRA = "pip install 'flexdiff[ray]'"
RETRIES = 3  # restarts of a dead actor, retries of a task whose worker died


@dataclass(frozen=True)
class Workers:
    """Where independent jobs run: `count` local Ray workers, or an existing cluster at `address`
    (count = 0 there: one worker per CPU, or per GPU with `gpus`). No workers: serially in this process."""

    count: int = 0
    address: str | None = None
    threads: int = 1  # torch threads per worker
    gpus: float = 0.0  # GPUs per worker (Ray's num_gpus)

    def __post_init__(self):
        if self.count < 0:
            raise FlexdiffError(f"--workers {self.count}: must be at least 1 (or leave it out to run serially)")
        if self.address is not None and not self.address.strip():
            raise FlexdiffError("--ray-address '': give the cluster's address (e.g. auto or ray://HOST:10001)")
        if self.threads < 1:
            raise FlexdiffError(f"--threads {self.threads}: must be at least 1")
        if self.gpus < 0:
            raise FlexdiffError(f"--gpus-per-worker {self.gpus}: must be >= 0")

    @property
    def parallel(self) -> bool:
        return self.count > 0 or self.address is not None


SERIAL = Workers()


def from_options(workers: int | None, address: str | None, threads: int | None = None,
                 gpus: float = 0.0) -> Workers:
    """The CLI's --workers / --ray-address / --threads, checked; Ray is required only when asked for."""
    w = Workers(count=workers or 0, address=address, threads=threads or 1, gpus=gpus)
    if w.parallel:
        require_ray()
    if address is not None:
        check_reachable(address)
    return w


CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str, option: str = "--ray-address") -> None:
    """A HOST:PORT (or ray://HOST:PORT) that nothing answers is refused within CONNECT_TIMEOUT_S, before any work;
    Ray itself would retry until killed. 'auto' is left to Ray, which answers at once when no cluster runs here."""
    import re
    import socket

    m = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address.strip())
    if address.strip() == "auto":
        return
    if m is None:
        raise FlexdiffError(f"{option} {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    host, port = m.group(1), int(m.group(2))
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise FlexdiffError(f"{option} {address}: nothing answers at {host}:{port} within {CONNECT_TIMEOUT_S:g} s "
                            f"({why}); start the cluster there first (ray start --head) or leave the option out") from None


def require_ray():
    try:
        import ray
    except ImportError:
        raise FlexdiffError(f"--workers / --ray-address need Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def connect(workers: Workers):
    """Join the cluster at `address`, or start a local one sized for `count` workers (once per process)."""
    ray = require_ray()
    if not ray.is_initialized():
        common = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                      runtime_env={"env_vars": {"OMP_NUM_THREADS": str(workers.threads)}})
        try:
            if workers.address is not None:
                ray.init(address=workers.address, **common)
            else:
                ray.init(num_cpus=workers.count * workers.threads, **common)
        except ConnectionError as e:
            raise FlexdiffError(f"--ray-address {workers.address}: no Ray cluster answered ({e})") from None
    return ray


def pool_size(workers: Workers) -> int:
    """How many actors to start: `count`, or on a cluster one per CPU (per GPU when GPUs are asked for)."""
    if workers.count:
        return workers.count
    ray = connect(workers)
    res = ray.cluster_resources()
    if workers.gpus:
        return max(1, int(res.get("GPU", 0) // workers.gpus))
    return max(1, int(res.get("CPU", 1) // workers.threads))


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def set_worker_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class ActorPool:
    """`size` Ray actors of `cls(*args)`, each kept busy with one call at a time."""

    def __init__(self, workers: Workers, cls: type, *args):
        ray = connect(workers)
        self.ray = ray
        remote = ray.remote(num_cpus=workers.threads, num_gpus=workers.gpus, max_restarts=RETRIES,
                            max_task_retries=RETRIES)(cls)
        # the model and friends go to the object store once, not once per actor; the pool keeps the references,
        # so an actor that dies can be rebuilt from them (Ray frees an object when its last reference goes)
        self._args = [ray.put(a) for a in args]
        self.actors = [remote.remote(*self._args) for _ in range(pool_size(workers))]

    def map(self, method: str, items: Sequence[Any], on_result: Callable[[int, Any], None] | None = None) -> list:
        """Call `actor.method(item)` for every item across the actors; results in the items' order.
        `on_result(index, result)` runs in this process as each one arrives (checkpointing, progress)."""
        ray = self.ray
        results: list = [None] * len(items)
        queue = list(range(len(items)))
        running: dict = {}
        idle = list(self.actors)
        while queue or running:
            while queue and idle:
                i, actor = queue.pop(0), idle.pop(0)
                running[getattr(actor, method).remote(items[i])] = (i, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(done[0])
            results[i] = ray.get(done[0])
            idle.append(actor)
            if on_result is not None:
                on_result(i, results[i])
        return results

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors, self._args = [], []


def run_tasks(workers: Workers, fn: Callable, jobs: Sequence[dict],
              on_result: Callable[[int, Any], None] | None = None) -> list:
    """Run `fn(**job)` for every job as Ray tasks; results in the jobs' order."""
    ray = connect(workers)
    remote = ray.remote(num_cpus=workers.threads, num_gpus=workers.gpus, max_retries=RETRIES)(fn)
    refs = {remote.remote(**job): i for i, job in enumerate(jobs)}
    results: list = [None] * len(jobs)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i = refs[done[0]]
        results[i] = ray.get(done[0])
        if on_result is not None:
            on_result(i, results[i])
    return results
