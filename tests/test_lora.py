"""A LoRA adapter (peft, through diffusers' adapter API) on the denoiser runs a schedule: the engine's hooks sit
on whole blocks, so the adapted layers inside them run or are cached like any other layer."""

import copy

import torch

from conftest import tiny_cond_unet
from flexdiff.conditioning import Conditioning
from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG
from flexdiff.sampling import initial_noise, sample
from flexdiff.schedule import Schedule


def test_a_lora_adapter_runs_a_schedule_with_the_merged_models_outputs():
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    base = tiny_cond_unet()
    adapted = copy.deepcopy(base)
    torch.manual_seed(5)
    adapted.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                   target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = [m for m in adapted.modules() if isinstance(m, LoraLayer)]
    assert layers
    noise = initial_noise(3, (4, 8, 8), seed=0)
    cond = Conditioning(encoder_hidden_states=torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(1)),
                        guidance_scale=3.0)
    schedule = Schedule.deepcache("dpmsolver++", 8, 3, 0)

    def run(unet):
        return sample(unet, DEFAULT_SCHEDULER_CONFIG, schedule, noise, cond=cond)

    with_adapter = run(adapted)
    assert with_adapter.calls == {"full": 3, "partial": 5, "null": 0}
    assert not torch.allclose(with_adapter.images, run(base).images, atol=1e-3)  # the adapter does something
    for layer in layers:
        layer.merge()  # the adapter folded into the weights
    merged = run(adapted)
    # the same up to float32 round-off at the images' own scale (this random model's outputs reach hundreds)
    scale = float(with_adapter.images.abs().max())
    torch.testing.assert_close(merged.images, with_adapter.images, atol=1e-6 * scale, rtol=1e-4)
