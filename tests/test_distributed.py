"""Search and expert training on Ray: the same result as serial, a killed worker replaced, clear errors.

The Ray tests start a local two-CPU Ray once for the module; they are skipped, with the reason,
where the optional `ray` extra is not installed (`make test` installs it).
"""

import json
import os
import signal

import pytest
import torch

from flexdiff.errors import FlexdiffError
from flexdiff.parallel import Workers, from_options
from test_cli import assert_user_error, run  # noqa: E402


def test_workers_settings_are_checked():
    assert not Workers().parallel and Workers(count=2).parallel and Workers(address="auto").parallel
    for bad, fragment in ((dict(count=-1), "--workers"), (dict(address=" "), "--ray-address"),
                          (dict(count=2, threads=0), "--threads"), (dict(count=1, gpus=-1), "--gpus-per-worker")):
        with pytest.raises(FlexdiffError, match=fragment):
            Workers(**bad)


def test_without_ray_workers_are_refused_with_the_install_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("no ray here")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert from_options(None, None) == Workers()  # serial needs no Ray
    with pytest.raises(FlexdiffError, match=r"flexdiff\[ray\]"):
        from_options(2, None)


def test_cli_refuses_workers_without_ray(monkeypatch, tiny_model_dir, tmp_path):
    import flexdiff.parallel as parallel

    def missing():
        raise FlexdiffError(f"--workers / --ray-address need Ray, which is not installed: {parallel.RAY_EXTRA}")

    monkeypatch.setattr(parallel, "require_ray", missing)
    code, out = run("search", "--model", tiny_model_dir, "--out", tmp_path / "s", "--budget", "0.1",
                    "--workers", 2)
    assert_user_error(code, out, "flexdiff[ray]")
    assert not (tmp_path / "s").exists()


ray = pytest.importorskip("ray", reason="the optional ray extra is not installed (pip install 'flexdiff[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Serial runs on one torch thread, like each worker: the same arithmetic, so bit-equal results."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _without_timings(history: list[dict]) -> list[dict]:
    return [dict(h, seconds=None, scored=[dict(c, seconds=None, worker=None) for c in h["scored"]]) for h in history]


def _search_args(model_dir, out):
    return ["search", "--model", model_dir, "--out", out, "--budget", "0.1", "--population", 4, "--generations", 2,
            "--eval-samples", 16, "--steps", "5,10", "--threads", 1]


def test_parallel_search_equals_serial(local_ray, one_thread, tiny_model_dir, tmp_path):
    code, out = run(*_search_args(tiny_model_dir, tmp_path / "serial"))
    assert code == 0, out
    code, out = run(*_search_args(tiny_model_dir, tmp_path / "parallel"), "--workers", 2)
    assert code == 0, out
    s, p = tmp_path / "serial", tmp_path / "parallel"
    assert json.loads((s / "best.json").read_text()) == json.loads((p / "best.json").read_text())
    hs, hp = (json.loads((d / "history.json").read_text()) for d in (s, p))
    assert _without_timings(hs) == _without_timings(hp)
    workers = {c["worker"] for h in hp for c in h["scored"]}
    assert {c["worker"] for h in hs for c in h["scored"]} == {"local"}
    assert len(workers) == 2 and "local" not in workers  # both actors scored, and each says who it is


class KillsAWorker:
    """A progress stand-in that kills the process of the worker that scored the 3rd candidate."""

    def __init__(self, state_file):
        self.state_file, self.seen, self.killed, self.tasks = state_file, 0, None, []

    def add_task(self, description, **kw):
        self.tasks.append(description)
        return len(self.tasks) - 1

    def remove_task(self, task):
        pass

    def update(self, task, advance=0, **kw):
        if not self.tasks[task].startswith("generation"):  # the teacher's sampling, the generations' bar
            return
        self.seen += advance
        if self.killed is None and self.seen >= 3:
            evaluated = json.loads(self.state_file.read_text())["evaluated"]
            worker = next(e["worker"] for e in evaluated.values())
            self.killed = worker
            os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)


def test_a_killed_worker_is_replaced_and_the_result_unchanged(local_ray, one_thread, tiny_model_dir, tmp_path):
    from flexdiff.anatomy import num_branches
    from flexdiff.metrics import QualityMeter
    from flexdiff.models import load_model
    from flexdiff.search import SearchConfig, search_from_settings
    from flexdiff.search.space import make_space

    model = load_model(tiny_model_dir)
    meter = QualityMeter.for_loaded(model)
    cfg = SearchConfig(budget=0.1, population=4, generations=2, eval_samples=16)

    def search(out, workers, progress=None):
        space = make_space("segment", "dpmsolver++", 1000, num_branches(model.unet), step_choices=(5, 10))
        return search_from_settings(model, meter, space, cfg, out, progress=progress, workers=workers).run()

    serial = search(tmp_path / "serial", Workers())
    killer = KillsAWorker(tmp_path / "parallel" / "search_state.json")
    parallel = search(tmp_path / "parallel", Workers(count=2), killer)
    assert killer.killed is not None
    assert parallel.best == serial.best and parallel.best.meta == serial.best.meta
    assert _without_timings(parallel.history) == _without_timings(serial.history)


def test_parallel_experts_give_bit_identical_weights(local_ray, one_thread, tmp_path):
    from flexdiff.experts.pipeline import ExpertsConfig, ExpertsPipeline
    from flexdiff.io import load_weights
    from flexdiff.models import load_model

    cfg = ExpertsConfig(k=2, sim_timesteps=6, sim_images=16, importance_batches=1, elastic_steps=3, agent_steps=2,
                        final_steps=3, batch_size=8, budget=0.6, num_steps=20)
    model = load_model()
    serial = ExpertsPipeline(model, tmp_path / "serial", cfg).run()
    parallel = ExpertsPipeline(model, tmp_path / "parallel", cfg, workers=Workers(count=2)).run()
    for k in range(2):
        for stage in ("elastic/expert_{k}/elastic.safetensors",):
            a, b = (load_weights(root / stage.format(k=k)) for root in (tmp_path / "serial", tmp_path / "parallel"))
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    ms, mp = (load_model(d) for d in (serial, parallel))
    for ea, eb in zip(ms.unet.experts, mp.unet.experts):
        sa, sb = ea.state_dict(), eb.state_dict()
        assert all(torch.equal(sa[n], sb[n]) for n in sa)


def test_a_killed_parallel_driver_resumes_to_the_serial_result(local_ray, one_thread, tiny_model_dir, tmp_path):
    from flexdiff.anatomy import num_branches
    from flexdiff.metrics import QualityMeter
    from flexdiff.models import load_model
    from flexdiff.search import SearchConfig, search_from_settings
    from flexdiff.search.space import make_space

    model = load_model(tiny_model_dir)
    meter = QualityMeter.for_loaded(model)
    cfg = SearchConfig(budget=0.1, population=4, generations=2, eval_samples=16)

    def search(out, workers):
        space = make_space("segment", "dpmsolver++", 1000, num_branches(model.unet), step_choices=(5, 10))
        return search_from_settings(model, meter, space, cfg, out, workers=workers)

    serial = search(tmp_path / "serial", Workers()).run()

    class Killed(Exception):
        pass

    def kill(generation):
        if generation == 1:
            raise Killed

    with pytest.raises(Killed):
        search(tmp_path / "parallel", Workers(count=2)).run(on_generation=kill)
    resumed = search(tmp_path / "parallel", Workers(count=2)).run()
    assert resumed.best == serial.best
    assert _without_timings(resumed.history) == _without_timings(serial.history)
