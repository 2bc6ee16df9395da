import torch
from torch.utils.flop_counter import FlopCounterMode

from flexdiff.cost import measure_step_costs
from flexdiff.schedule import FULL, NULL, Schedule, partial


def test_full_step_macs_equal_plain_model_count(unet):
    with FlopCounterMode(display=False) as fc:
        unet(torch.zeros(1, 1, 16, 16), torch.tensor([500]))
    assert measure_step_costs(unet).full == fc.get_total_flops() / 2


def test_partial_costs_grow_with_branch_and_stay_below_full(unet, cond_unet):
    for model in (unet, cond_unet):
        c = measure_step_costs(model)
        assert all(a < b for a, b in zip(c.partial, c.partial[1:]))
        assert 0 < c.partial[0] and c.partial[-1] < c.full


def test_schedule_macs_sum_over_steps(unet):
    c = measure_step_costs(unet)
    s = Schedule("ddim", (FULL, partial(1), NULL, FULL, partial(0)))
    assert c.schedule_macs(s) == 2 * c.full + c.partial[1] + c.partial[0]
    assert c.schedule_macs(Schedule.full("ddim", 10)) == 10 * c.full


def test_guidance_doubles_cost(cond_unet):
    plain, guided = measure_step_costs(cond_unet), measure_step_costs(cond_unet, guidance=True)
    s = Schedule("ddim", (FULL, partial(0), NULL))
    assert guided.schedule_macs(s) == 2 * plain.schedule_macs(s)


def test_latency_is_measured_without_autograd(unet):
    # a timed forward that records a graph measures autograd's bookkeeping too, not the network
    from flexdiff.cost import measure_latency

    grad_seen = []
    unet.register_forward_hook(lambda *_: grad_seen.append(torch.is_grad_enabled()))
    assert measure_latency(unet, batch=2, repeats=1) > 0
    assert grad_seen and not any(grad_seen)
