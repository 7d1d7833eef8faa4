"""How close the fp32 CPU fast path runs to this machine's convolution throughput.

    python benchmarks/fp32_ceiling.py            # R50-NAS-FPN, CPU, 2 threads, 640x640, batch 1

RetinaNet's time is almost all convolution. This script profiles the network of the fp32 fast
path (BN folded, channels-last) by operator, counts the convolutions' FLOPs
(torch.utils.flop_counter), and measures, standalone on the same threads, the 3x3 256->256 conv
at each pyramid level's size: the conv shape that holds most of the model's FLOPs and oneDNN's
fastest one here. From these it prints the lowest network time reachable if every conv ran at the
best standalone rate and everything else took the time it takes now, next to the plain model's
end-to-end time x 0.7 (the speed issue's target).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness import interleaved, median_ms
from nasfpn.apps.bench import environment
from nasfpn.core.presets import get_config
from nasfpn.deploy.fast import optimize_for_inference
from nasfpn.models import build_model


def conv_rate(size: int, channels: int, rounds: int) -> float:
    """GFLOP/s of a 3x3 conv, channels -> channels, on a size x size channels-last input."""
    conv = nn.Conv2d(channels, channels, 3, padding=1).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, channels, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        seconds = median_ms(interleaved({"conv": lambda: conv(x)}, rounds, warmup=2), "conv") / 1e3
    return 2 * channels * channels * 9 * size * size / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="retinanet_r50_nasfpn_crop640_50e")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = get_config(args.model)
    plain = build_model(cfg.model, pretrained_backbone=False).eval()
    fast = optimize_for_inference(plain)
    x = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        times = interleaved({"plain": lambda: plain(x), "fast": lambda: fast(x)}, args.rounds, warmup=2)
    plain_s, fast_s = median_ms(times, "plain") / 1e3, median_ms(times, "fast") / 1e3

    with FlopCounterMode(display=False) as counter:
        fast(x)
    conv_flops = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    total_flops = counter.get_total_flops()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.rounds):
            fast(x)
    conv_us = sum(e.self_cpu_time_total for e in prof.key_averages() if "convolution" in e.key)
    conv_s = conv_us / 1e6 / args.rounds
    other_s = max(fast_s - conv_s, 0.0)

    levels = {f"P{lvl}": conv_rate(args.size // 2**lvl, cfg.model.neck.channels, args.rounds) for lvl in range(3, 8)}
    best = max(levels.values())
    floor_s = conv_flops / (best * 1e9) + other_s
    env = environment("cpu")
    print(
        f"# {args.model} fp32 fast path vs conv throughput: cpu, {args.threads} threads, {args.size}x{args.size}, "
        f"batch 1, {args.rounds} rounds (medians)"
    )
    print(f"torch {env['torch']}, {env['cpu']}\n")
    print("| quantity | value |\n|---|---|")
    print(f"| plain network (eager, NCHW, BN) | {plain_s * 1e3:.1f} ms |")
    print(f"| fast-path network (fold + channels-last) | {fast_s * 1e3:.1f} ms ({fast_s / plain_s:.3f}x plain) |")
    print(f"| FLOPs, all / in convolutions | {total_flops / 1e9:.1f} G / {conv_flops / 1e9:.1f} G |")
    print(
        f"| fast path: time in convolutions (profiler) | {conv_s * 1e3:.1f} ms = {conv_flops / conv_s / 1e9:.0f} GFLOP/s |"
    )
    print(f"| fast path: everything else | {other_s * 1e3:.1f} ms |")
    print(
        "| standalone 3x3 conv, channels-last, GFLOP/s | " + ", ".join(f"{k} {v:.0f}" for k, v in levels.items()) + " |"
    )
    print(
        f"| network floor: all convs at {best:.0f} GFLOP/s + everything else as now | {floor_s * 1e3:.1f} ms "
        f"({floor_s / plain_s:.3f}x plain) |"
    )
    print(f"| 0.7x plain network | {0.7 * plain_s * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
