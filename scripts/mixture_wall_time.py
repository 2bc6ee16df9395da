"""Wall-clock time of the shipped mixture against the teacher and against sub-networks of fixed width.

Backs the wall-clock numbers in docs/experts.md: one sub-network per width setting (batch 250,
one forward, 5 repeats) and whole DDIM-100 runs (500 samples) of the mixture and the teacher,
run back to back.

    .venv/bin/python scripts/mixture_wall_time.py [--mixture DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from flexdiff.cost import count_macs
from flexdiff.experts.elastic import ElasticUNet, SubnetSpec
from flexdiff.models import default_mixture_dir, load_model
from flexdiff.sampling import initial_noise, sample
from flexdiff.schedule import Schedule

WIDTHS = [(32, 64, 64), (32, 56, 48), (32, 48, 48), (32, 32, 32), (32, 24, 40), (32, 16, 32), (32, 8, 32)]


def forward_seconds(net, x, t, repeats: int = 5) -> float:
    with torch.no_grad():
        for _ in range(2):
            net(x, t)
        t0 = time.perf_counter()
        for _ in range(repeats):
            net(x, t)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixture", default=str(default_mixture_dir()))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    teacher = load_model()
    elastic = ElasticUNet(teacher.unet)
    x, t = torch.randn(250, 1, 16, 16), torch.full((250,), 500)
    base_s, base_macs = forward_seconds(teacher.unet, x, t), count_macs(teacher.unet)
    print("widths | MACs / teacher | forward wall / teacher")
    for w in WIDTHS:
        net = elastic.extract(SubnetSpec(w, (1, 1, 1)))
        print(f"{w} | {count_macs(net) / base_macs:.3f} | {forward_seconds(net, x, t) / base_s:.3f}")
    mixture = load_model(args.mixture)
    noise, ddim = initial_noise(500, (1, 16, 16), 0), Schedule.full("ddim", 100)
    for rep in range(args.repeats):
        ms = {}
        for name, m in (("mixture", mixture), ("teacher", teacher)):
            ms[name] = 1000 * sample(m.unet, m.scheduler_config, ddim, noise, 250).seconds / len(noise)
        print(f"run {rep}: mixture {ms['mixture']:.1f} ms/image, teacher {ms['teacher']:.1f} ms/image, "
              f"wall speed-up {ms['teacher'] / ms['mixture']:.2f}x")


if __name__ == "__main__":
    main()
