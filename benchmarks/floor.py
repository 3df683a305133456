"""Each PEFT method's training step against the floor: the frozen base's forward and backward to its inputs.

No PEFT step can cost less than the base model's forward plus the backward that carries gradients
down to the inputs with every weight frozen. For LoRA (dropout 0 and 0.1), DoRA, IA3, Adapter and
prompt tuning on SmolLM2-135M this measures the step time and peak RSS of ours and of peft's
(where peft has the method), each in a fresh process whose steps alternate with those of a
second, frozen copy of the base, so each step/floor ratio pairs two steps taken seconds apart;
every second round loads the floor's copy first, the others read the variant's peak RSS before
loading it. Every round runs each variant (and a floor process, for the floor's peak) in a
rotated order; each ratio is the median over rounds.

    python benchmarks/floor.py --quick               # tiny random Llama, about a minute
    python benchmarks/floor.py --rounds 3            # SmolLM2-135M, batch 8 x 128: about 40 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import peft
import torch
import transformers
from lora_step import base_model, paired_ratio, token_batch
from peft import IA3Config, LoraConfig, PromptTuningConfig, TaskType, get_peft_model
from torch import nn

import lightning_peft
from lightning_peft import IA3, Adapter, LoRA, PromptTuning

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
IA3_TARGETS, IA3_FEEDFORWARD = ["k_proj", "v_proj", "down_proj"], ["down_proj"]
VIRTUAL_TOKENS = 20
THREADS = 2

# variant -> (ours, peft's): each builds the adapted model from the base, in place or wrapped; None: no such method
METHODS = {
    "lora d0": (lambda m: LoRA(r=8, alpha=16, target_modules=ATTENTION).inject(m),
                lambda m: get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION))),
    "lora d0.1": (lambda m: LoRA(r=8, alpha=16, dropout=0.1, target_modules=ATTENTION).inject(m),
                  lambda m: get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                         target_modules=ATTENTION))),
    "dora d0": (lambda m: LoRA(r=8, alpha=16, use_dora=True, target_modules=ATTENTION).inject(m),
                lambda m: get_peft_model(m, LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=ATTENTION))),
    "ia3": (lambda m: IA3(target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD).inject(m),
            lambda m: get_peft_model(m, IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD))),
    "adapter": (lambda m: Adapter(bottleneck_dim=64).inject(m), None),  # peft has no bottleneck adapters
    "prompt tuning": (lambda m: PromptTuning(num_virtual_tokens=VIRTUAL_TOKENS).inject(m),
                      lambda m: get_peft_model(m, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                     num_virtual_tokens=VIRTUAL_TOKENS))),
}


def variants() -> list[str]:
    """Every process one round runs: the floor, then each method as ours and as peft's."""
    names = ["floor"]
    for method, (_, theirs) in METHODS.items():
        names += [f"{method}, ours"] + ([f"{method}, peft"] if theirs else [])
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every variant once, in a new order")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process, after one warm-up step")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--only", help="comma-separated methods to run (default: all)")
    parser.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's architecture at random")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one variant's process
    parser.add_argument("--floor-first", action="store_true", help=argparse.SUPPRESS)  # internal: load order
    args = parser.parse_args(argv)
    args.device, args.dtype = "cpu", "float32"
    return args


def adapted(variant: str, model: nn.Module) -> nn.Module:
    """The base with ``variant``'s method applied; for the floor, the base with every weight frozen."""
    model.requires_grad_(False)
    if variant == "floor":
        return model
    method, side = variant.split(", ")
    ours, theirs = METHODS[method]
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ours(model) if side == "ours" else theirs(model)


def training_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """One step on ``ids``: AdamW on the trainable weights, or with none (the floor) the backward to the inputs."""
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4) if trained else None
    embed = model.get_input_embeddings()

    def step() -> None:
        if optimizer is None:  # the floor: gradients reach the inputs, no weight takes one
            inputs = embed(ids).detach().requires_grad_()
            model(inputs_embeds=inputs, labels=ids).loss.backward()
            return
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def seconds(step: Callable[[], None]) -> float:
    """Wall time of one call of ``step``."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def warmed_up(variant: str, args: argparse.Namespace) -> tuple[nn.Module, Callable[[], None]]:
    """``variant`` on a freshly loaded base, and its training step, run once to warm up."""
    model = adapted(variant, base_model(args)).train()
    step = training_step(model, token_batch(model.config.vocab_size, args.batch, args.seq))
    step()
    return model, step


def worker(args: argparse.Namespace) -> None:
    """One process: the variant's steps interleaved with a frozen base copy's, and its peak RSS.

    The two models alternate steps, so each ratio compares two steps taken seconds apart, which
    this shared machine's drift (up to 25% between processes) does not reach. Which model is
    loaded first also matters (the first ran 3-6% slower, whichever it was), so every second round
    loads the floor's copy first (``--floor-first``); the others load the variant alone first and
    read its peak RSS over a warm-up and a step before the floor's copy exists.
    """
    torch.set_num_threads(THREADS)
    floor_step = warmed_up("floor", args)[1] if args.floor_first else None
    model, step = warmed_up(args.worker, args)
    times = [] if args.floor_first else [seconds(step)]
    peak = None if args.floor_first else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"peak_rss_mib": peak, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if args.worker == "floor":
        times += [seconds(step) for _ in range(args.steps - 1)]
        print(json.dumps({"step_s": statistics.median(times), **result}))
        return
    if floor_step is None:
        floor_step = warmed_up("floor", args)[1]
    paired, floor_times = [], []
    for i in range(args.steps):  # alternate which goes first
        if i % 2:
            paired.append(seconds(step))
            floor_times.append(seconds(floor_step))
        else:
            floor_times.append(seconds(floor_step))
            paired.append(seconds(step))
    ratios = [t / f for t, f in zip(paired, floor_times, strict=True)]
    print(json.dumps({"step_s": statistics.median(times + paired), "floor_s": statistics.median(floor_times),
                      "to_floor": statistics.median(ratios), **result}))


def run_rounds(args: argparse.Namespace, names: list[str]) -> dict[str, list[dict]]:
    """Every variant once per round in its own process, each round starting one later in the list."""
    shared = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    shared += (["--quick"] if args.quick else []) + (["--random-weights"] if args.random_weights else [])
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for i, name in enumerate(names[shift:] + names[:shift]):
            print(f"round {round_ + 1}/{args.rounds}, {i + 1}/{len(names)}: {name}", file=sys.stderr, flush=True)
            order = ["--floor-first"] if round_ % 2 and name != "floor" else []
            command = [sys.executable, os.path.abspath(__file__), "--worker", name, *shared, *order]
            out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            results[name].append(json.loads(out.splitlines()[-1]))
    return results


def column(results: dict[str, list[dict]], name: str, key: str) -> list[float]:
    return [r[key] for r in results[name]]


def peak_ratio(num: list[float | None], den: list[float | None]) -> float:
    """Median of the per-round peak ratios over the rounds that read both peaks (the variant loaded first)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True) if a is not None and b is not None)


def to_floor(results: dict[str, list[dict]], name: str) -> list[float]:
    """Each round's step time over the floor's, both timed interleaved in the variant's process."""
    return [1.0] * len(results[name]) if name == "floor" else column(results, name, "to_floor")


def table(results: dict[str, list[dict]]) -> str:
    """One row per variant: median step and peak, each against the floor and (for ours) against peft's."""
    floor_rss = column(results, "floor", "peak_rss_mib")
    rows = ["| variant | trainable | step (s) | step / floor | step / peft | peak RSS (MiB) | peak / floor "
            "| peak / peft | step / floor, each round |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name in results:
        step, rss = column(results, name, "step_s"), column(results, name, "peak_rss_mib")
        ratios = to_floor(results, name)
        peer = name.replace(", ours", ", peft")
        vs_peft = name.endswith(", ours") and peer in results
        cells = [name, f"{results[name][0]['trainable']:,}", f"{statistics.median(step):.3f}",
                 f"{statistics.median(ratios):.3f}",
                 f"{paired_ratio(ratios, to_floor(results, peer)):.3f}" if vs_peft else "",
                 f"{statistics.median(r for r in rss if r is not None):.0f}", f"{peak_ratio(rss, floor_rss):.3f}",
                 f"{peak_ratio(rss, column(results, peer, 'peak_rss_mib')):.3f}" if vs_peft else "",
                 ", ".join(f"{r:.3f}" for r in ratios) if name != "floor" else ""]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def header(args: argparse.Namespace) -> str:
    model = "tiny random Llama" if args.quick else "SmolLM2-135M" + (" (random weights)" if args.random_weights else "")
    return "\n".join([
        f"- machine: {os.cpu_count()} CPUs, {THREADS} torch threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, "
        f"lightning-peft {lightning_peft.__version__}",
        f"- command: `python {shlex.join(sys.argv)}`",
        f"- {model} fp32, batch {args.batch} x {args.seq}, causal-LM loss; LoRA/DoRA r=8 alpha=16 on "
        f"{'/'.join(ATTENTION)}; IA3 on {'/'.join(IA3_TARGETS)}; Adapter bottleneck 64; prompt tuning "
        f"{VIRTUAL_TOKENS} virtual tokens; AdamW; {args.rounds} rounds, each variant a fresh process: peak RSS over "
        f"a warm-up and a step (rounds 1, 3, ...; rounds 2, 4, ... load the floor's copy first, no peak), and "
        f"{args.steps} steps alternating with a frozen base copy's; step: median; step / floor: median over "
        f"rounds of each process's median paired ratio; peak / floor: against a floor-only process of the "
        f"same round",
    ])


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    names = variants()
    if args.only:
        wanted = {m.strip() for m in args.only.split(",")}
        names = [n for n in names if n == "floor" or n.split(", ")[0] in wanted]
    results = run_rounds(args, names)
    print(header(args) + "\n\n" + table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
