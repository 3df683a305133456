"""What one LoRA layer costs beyond the frozen base layer, piece by piece, on the floor benchmark's shapes.

One attention projection of SmolLM2-135M at batch 8 x 128 (1,024 tokens, 576 in, 576 or 192
out), rank 8: forward plus backward to the input for the frozen layer alone (the floor), for
the fused LoRA layer with dropout 0 and 0.1, and for the elementwise and rank-8 pieces the
dropout path adds. Every case runs in interleaved rounds in one process; medians.

    python benchmarks/lora_layer_costs.py            # about a minute
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightning_peft.core.dropout import as_factor, keep_mask
from lightning_peft.lora.fused import FusedLoRALinear, rank_product

TOKENS, IN, RANK, THREADS = 1024, 576, 8, 2


def cases(out_features: int) -> dict[str, Callable[[], object]]:
    """Each case a closure; the layer ones run forward and backward, the pieces one operation each."""
    torch.manual_seed(0)
    x = torch.randn(TOKENS, IN).requires_grad_()
    weight = torch.randn(out_features, IN) / IN**0.5
    lora_a = (torch.randn(RANK, IN) / IN**0.5).requires_grad_()
    lora_b = (torch.randn(out_features, RANK) / RANK**0.5).requires_grad_()
    grad = torch.randn(TOKENS, out_features)
    keep = keep_mask((TOKENS, IN), 0.1, x.device)
    factor = as_factor(keep, x.dtype)

    def floor() -> None:
        x.grad = None
        F.linear(x, weight).backward(grad)

    def lora(mask: Callable[[], torch.Tensor | None]) -> Callable[[], None]:
        def step() -> None:
            x.grad = lora_a.grad = lora_b.grad = None
            FusedLoRALinear.apply(x, weight, None, lora_a, lora_b, 2.0, mask()).backward(grad)
        return step

    rows, hidden = x.detach(), torch.randn(TOKENS, RANK)
    return {
        "floor: frozen layer": floor,
        "LoRA d0": lora(lambda: None),
        "LoRA d0.1, mask given": lora(lambda: keep),
        "LoRA d0.1, mask drawn": lora(lambda: keep_mask((TOKENS, IN), 0.1, x.device)),
        "piece: draw a mask": lambda: keep_mask((TOKENS, IN), 0.1, x.device),
        "piece: mask to float": lambda: as_factor(keep, x.dtype),
        "piece: x * mask": lambda: rows * factor,
        "piece: grad_x += m * mask": lambda: torch.zeros(TOKENS, IN).addcmul_(rows, factor),
        "piece: x @ A^T (rank 8)": lambda: rank_product(rows, lora_a.detach()),
        "piece: x @ A^T, plain layout": lambda: rows @ lora_a.detach().T,
        "piece: grad @ B (rank 8)": lambda: rank_product(grad, lora_b.detach().T),
        "piece: grad @ B, plain layout": lambda: grad @ lora_b.detach(),
        "piece: hidden @ A (rank 8)": lambda: hidden @ lora_a.detach(),
    }


def measure(run: dict[str, Callable[[], object]], rounds: int, repeat: int) -> dict[str, float]:
    """Median milliseconds per call of each case over interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in run}
    for fn in run.values():
        for _ in range(5):
            fn()
    for _ in range(rounds):
        for name, fn in run.items():
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name].append((time.perf_counter() - start) / repeat * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print(f"- {THREADS} torch threads, torch {torch.__version__}; {TOKENS} tokens, {IN} in, rank {RANK}; "
          f"medians of {args.rounds} interleaved rounds of {args.repeat} calls\n")
    results = {out: measure(cases(out), args.rounds, args.repeat) for out in (576, 192)}
    print("| case | out 576 (ms) | / floor | out 192 (ms) | / floor |\n| --- | ---: | ---: | ---: | ---: |")
    for name in results[576]:
        cells = [f"{results[out][name]:.3f} | {results[out][name] / results[out]['floor: frozen layer']:.2f}"
                 for out in (576, 192)]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
