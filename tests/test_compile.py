"""A static schedule compiles: under torch.compile the step engine adds no graph break inside the denoiser
and no recompile after the first run, and the compiled output equals the eager one.

Dynamo is driven with a counting backend (the graphs are run as traced, no code generation), so the test
checks what dynamo captures, guards and breaks, not inductor's kernels."""

import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from conftest import tiny_class_unet, tiny_unet
from flexdiff.engine import apply_schedule
from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG
from flexdiff.schedule import FULL, NULL, Schedule, partial

DEVICE = torch.device(os.environ.get("FLEXDIFF_TEST_DEVICE", "cpu"))  # make gpu-check runs these on CUDA


class Counting:
    """A torch.compile backend that counts the graphs dynamo hands it."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _loop(model, scheduler, schedule, x, labels=None, guided=False):
    """What a pipeline does: set_timesteps, then per step one (guided: two) denoiser calls and scheduler.step."""
    scheduler.set_timesteps(**schedule.pipeline_kwargs())
    kwargs = {} if labels is None else {"class_labels": labels}
    for t in scheduler.timesteps:
        with torch.no_grad():
            if guided:  # two calls per step: two cache slots
                eps = model(x, t, class_labels=torch.full_like(labels, 3)).sample
                eps = eps + 2.0 * (model(x, t, **kwargs).sample - eps)
            else:
                eps = model(x, t, **kwargs).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


CASES = {
    "deepcache ddim": (lambda: DDIMScheduler.from_config(DEFAULT_SCHEDULER_CONFIG), Schedule.deepcache("ddim", 9, 3, 0)),
    "searched dpm++ with timesteps": (
        lambda: DPMSolverMultistepScheduler.from_config(DEFAULT_SCHEDULER_CONFIG),
        Schedule("dpmsolver++", (FULL, partial(0), NULL, FULL, partial(1), NULL, FULL),
                 timesteps=(999, 850, 700, 500, 300, 150, 50))),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("guided", [False, True])
def test_a_compiled_unet_runs_a_static_schedule_without_graph_breaks_or_recompiles(case, guided):
    import torch._dynamo
    from torch._dynamo.utils import counters

    make_scheduler, schedule = CASES[case]
    unet = (tiny_class_unet() if guided else tiny_unet()).to(DEVICE)
    labels = torch.tensor([0, 1], device=DEVICE) if guided else None
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    scheduler = make_scheduler()
    torch._dynamo.reset()
    counters.clear()
    backend = Counting()
    with apply_schedule(SimpleNamespace(unet=unet, scheduler=scheduler), schedule) as engine:
        eager = _loop(unet, scheduler, schedule, x, labels, guided)
        eager_calls = engine.calls
        compiled = torch.compile(unet, backend=backend, fullgraph=True)  # fullgraph: any break is an error
        first = _loop(compiled, scheduler, schedule, x, labels, guided)
        graphs = backend.graphs
        second = _loop(compiled, scheduler, schedule, x, labels, guided)
        calls = engine.calls
    assert backend.graphs == graphs  # no recompile after the first run
    kinds = {(s.kind, s.branch) for s in schedule.steps if s.kind is not NULL}
    assert graphs <= (len(kinds) + 1) * (2 if guided else 1)  # one graph per (kind, branch, slot), plus a full
    # step that finds the cache already filled
    assert not counters["graph_break"]
    assert torch.allclose(first, eager, atol=1e-5) and torch.equal(first, second)
    assert calls == {k: 3 * v for k, v in eager_calls.items()}  # compiled calls are counted like eager ones


def test_compiling_before_apply_schedule_also_works():
    """`pipe.unet = torch.compile(pipe.unet)` first, then apply_schedule: the engine hooks the module the compiled
    one wraps, so the same graphs as above are made (no break, no recompile), and the result is the eager one."""
    unet = tiny_unet().to(DEVICE)
    schedule = Schedule.deepcache("ddim", 6, 3, 0)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    scheduler = DDIMScheduler.from_config(DEFAULT_SCHEDULER_CONFIG)
    with apply_schedule(SimpleNamespace(unet=unet, scheduler=scheduler), schedule):
        eager = _loop(unet, scheduler, schedule, x)
    from torch._dynamo import reset

    reset()
    backend = Counting()
    compiled = torch.compile(unet, backend=backend, fullgraph=True)
    with apply_schedule(SimpleNamespace(unet=compiled, scheduler=scheduler), schedule) as engine:
        out = _loop(compiled, scheduler, schedule, x)
        graphs = backend.graphs
        again = _loop(compiled, scheduler, schedule, x)
        assert engine.calls == {"full": 4, "partial": 8, "null": 0}
    assert backend.graphs == graphs <= 3
    assert torch.allclose(out, eager, atol=1e-5) and torch.equal(out, again)


@pytest.mark.parametrize("shape", ["sd3", "flux"])
def test_a_compiled_transformer_runs_a_static_schedule_without_graph_breaks_or_recompiles(shape):
    """SD3-shaped (joint blocks, two streams) and FLUX-shaped (dual then single-stream blocks, the default
    transformer's shape), flow Euler: the block hooks compile like the UNet's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from flexdiff.samplers import FLOW_SCHEDULER_CONFIG, make_scheduler
    from tiny_transformers import MODELS, inputs

    model = MODELS[shape]().to(DEVICE)
    scale = 1000.0 if shape == "flux" else 1.0  # FLUX's pipeline passes t / 1,000
    kw = {k: v.to(DEVICE) for k, v in inputs(model, 0).items() if k != "timestep"}
    x = kw.pop("hidden_states")
    schedule = Schedule("flow-euler", (FULL, partial(0), NULL, FULL, partial(2), partial(1), FULL))
    scheduler = make_scheduler("flow-euler", FLOW_SCHEDULER_CONFIG)

    def loop(m):
        scheduler.set_timesteps(**schedule.pipeline_kwargs())
        h = x
        for t in scheduler.timesteps:
            with torch.no_grad():
                v = m(hidden_states=h, timestep=(t / scale).expand(2).to(DEVICE), **kw).sample
            h = scheduler.step(v, t, h).prev_sample
        return h

    torch._dynamo.reset()
    counters.clear()
    backend = Counting()
    with apply_schedule(SimpleNamespace(transformer=model, scheduler=scheduler), schedule) as engine:
        eager = loop(model)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        first = loop(compiled)
        graphs = backend.graphs
        second = loop(compiled)
        assert engine.calls == {"full": 9, "partial": 9, "null": 3}
    assert backend.graphs == graphs <= 5  # one per (kind, branch), plus a full step with a filled cache
    assert not counters["graph_break"]
    assert torch.allclose(first, eager, atol=1e-5) and torch.equal(first, second)
