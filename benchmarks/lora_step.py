"""Compare lightning-peft's LoRA with Hugging Face peft's LoRA on one causal LM, interleaved in one run.

Both sides adapt q/k/v/o projections (r=8, alpha=16) of identical base weights and see the same
random token batch. Measured: training step time (forward + backward + AdamW), peak RSS of a
process that trains (one subprocess per side), and eval forward latency unmerged and merged
against the bare base model. Runs alternate between the sides so machine noise hits both alike.

    python benchmarks/lora_step.py --quick           # tiny random Llama, under a minute
    python benchmarks/lora_step.py --reps 5          # SmolLM2-135M fp32, several minutes
    python benchmarks/lora_step.py --device cuda --dtype bfloat16 --batch 16 --seq 512   # GPU: tokens/s, memory
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import peft
import torch
import transformers
from models import smollm2
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_peft
from lightning_peft import LoRA

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
R, ALPHA = 8, 16
THREADS = 2
SIDES = ("ours", "peft")

Times = dict[str, list[float]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per side, after 1 warm-up")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on both sides")
    parser.add_argument("--mem-steps", type=int, default=2, help="training steps before reading peak RSS")
    parser.add_argument("--mem-reps", type=int, default=2, help="peak-RSS subprocesses per side")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the weights' dtype")
    parser.add_argument("--random-weights", action="store_true",
                        help="SmolLM2-135M's architecture at random (where the asset cannot be installed)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)  # internal: one peak-RSS subprocess
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    return args


def base_model(args: argparse.Namespace) -> nn.Module:
    """SmolLM2-135M, or with ``--quick`` a small random Llama (same seed, same weights every time), on the device."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    if args.quick:
        config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM(config).to(dtype=dtype, device=args.device)
    return smollm2(dtype, random_weights=args.random_weights).to(args.device)


def with_lora(side: str, model: nn.Module, dropout: float) -> nn.Module:
    """``model`` with LoRA on q/k/v/o from our library (in place) or from peft; the rest frozen."""
    torch.manual_seed(1)
    if side == "ours":
        return LoRA(r=R, alpha=ALPHA, dropout=dropout, target_modules=TARGETS).inject(model)
    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS))


def merged(side: str, model: nn.Module) -> nn.Module:
    """The model with its adapters folded into the base weights."""
    return lightning_peft.merge(model) if side == "ours" else model.merge_and_unload()


def token_batch(vocab_size: int, batch: int, seq: int, device: str = "cpu") -> Tensor:
    """A fixed-seed batch of random token ids."""
    return torch.randint(vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)


def trainable(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_step(model: nn.Module, ids: Tensor) -> Callable[[], None]:
    """A closure running one causal-LM training step on ``ids``: forward, backward, AdamW."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def eval_forward(model: nn.Module, ids: Tensor) -> Callable[[], None]:
    """A closure running one eval forward on ``ids`` without gradients."""
    model.eval()

    @torch.no_grad()
    def forward() -> None:
        model(input_ids=ids)

    return forward


def seconds(fn: Callable[[], None]) -> float:
    """Wall-clock seconds of one call (the GPU's queued work included)."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], None]], reps: int) -> Times:
    """Warm each closure up once, then time ``reps`` rounds, rotating which one goes first."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: Times = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(seconds(fns[name]))
    return times


def worker(args: argparse.Namespace) -> None:
    """Subprocess body: train one side for ``--mem-steps`` steps and print its peak memory in MiB.

    On CPU the process's peak RSS; on CUDA the peak memory allocated on the GPU.
    """
    model = with_lora(args.worker, base_model(args), args.dropout)
    step = train_step(model, token_batch(model.config.vocab_size, args.batch, args.seq, args.device))
    for _ in range(args.mem_steps):
        step()
    if args.device == "cuda":
        print(json.dumps({"peak_rss_mib": torch.cuda.max_memory_allocated() / 2**20}))
    else:
        print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss_interleaved(args: argparse.Namespace) -> Times:
    """Peak RSS (MiB) of one training subprocess per side and round, alternating which side runs first."""
    shared = ["--batch", str(args.batch), "--seq", str(args.seq), "--dropout", str(args.dropout),
              "--mem-steps", str(args.mem_steps), "--device", args.device, "--dtype", args.dtype]
    shared += (["--quick"] if args.quick else []) + (["--random-weights"] if args.random_weights else [])
    peaks: Times = {side: [] for side in SIDES}
    for rep in range(args.mem_reps):
        for side in SIDES if rep % 2 == 0 else SIDES[::-1]:
            command = [sys.executable, os.path.abspath(__file__), "--worker", side, *shared]
            out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            peaks[side].append(json.loads(out.splitlines()[-1])["peak_rss_mib"])
    return peaks


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios, so each ratio compares runs made close together."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def header(args: argparse.Namespace) -> str:
    """Machine, versions, command and settings, as markdown lines."""
    model = ("tiny random Llama (hidden 256, 4 layers, vocab 8192)" if args.quick
             else "SmolLM2-135M's architecture, random weights" if args.random_weights else "SmolLM2-135M")
    model += f" {args.dtype} on {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}"
    return "\n".join([
        f"- machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, "
        f"lightning-peft {lightning_peft.__version__}",
        f"- command: `python {shlex.join(sys.argv)}`",
        f"- {model}; LoRA r={R} alpha={ALPHA} dropout={args.dropout} on {'/'.join(TARGETS)}; batch {args.batch} x seq "
        f"{args.seq}; median of {args.reps} interleaved reps after 1 warm-up; peak memory ({memory_kind(args)}): "
        f"median of {args.mem_reps} subprocesses per side, after {args.mem_steps} steps; ratios: median of "
        "per-round ratios",
    ])


def memory_kind(args: argparse.Namespace) -> str:
    return "peak allocated on the GPU" if args.device == "cuda" else "peak RSS of the whole process"


def table(results: dict) -> str:
    """The markdown table ``| what | ours | peft | ours/peft |``."""
    rows = [("what", "ours", "peft", "ours/peft"), ("---", "---:", "---:", "---:")]
    for what, ours, peft_value, ratio, fmt in results["rows"]:
        rows.append((what, format(ours, fmt), format(peft_value, fmt), f"{ratio:.3f}"))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def summarize(params: dict[str, int], steps: Times, memory: Times, unmerged: Times, merged_: Times,
              tokens: int, memory_label: str) -> dict:
    """Medians and ratios of every measurement, plus the table rows."""
    med = {key: {name: statistics.median(ts) for name, ts in times.items()}
           for key, times in [("step", steps), ("memory", memory), ("unmerged", unmerged), ("merged", merged_)]}
    to_base = {key: {side: paired_ratio(times[side], times["base"]) for side in SIDES}
               for key, times in [("unmerged", unmerged), ("merged", merged_)]}

    def row(what: str, times: Times, value: dict[str, float], fmt: str) -> tuple:
        return what, value["ours"], value["peft"], paired_ratio(times["ours"], times["peft"]), fmt

    rows = [
        ("trainable parameters", params["ours"], params["peft"], params["ours"] / params["peft"], ","),
        row("training step: forward + backward + AdamW (s)", steps, med["step"], ".3f"),
        ("training tokens/s", tokens / med["step"]["ours"], tokens / med["step"]["peft"],
         paired_ratio([tokens / t for t in steps["ours"]], [tokens / t for t in steps["peft"]]), ",.0f"),
        row(f"{memory_label} (MiB)", memory, med["memory"], ".0f"),
        row(f"forward, unmerged, eval no_grad (s; base {med['unmerged']['base']:.3f})",
            unmerged, med["unmerged"], ".3f"),
        ("forward, unmerged / base (paired)", to_base["unmerged"]["ours"], to_base["unmerged"]["peft"],
         to_base["unmerged"]["ours"] / to_base["unmerged"]["peft"], ".3f"),
        row(f"forward, merged, eval no_grad (s; base {med['merged']['base']:.3f})", merged_, med["merged"], ".3f"),
        ("forward, merged / base (paired)", to_base["merged"]["ours"], to_base["merged"]["peft"],
         to_base["merged"]["ours"] / to_base["merged"]["peft"], ".3f"),
    ]
    raw = {"step_s": steps, "peak_rss_mib": memory, "forward_unmerged_s": unmerged, "forward_merged_s": merged_}
    return {"trainable": params, "median": med, "to_base": to_base, "raw": raw, "rows": rows}


def main() -> None:
    """Run the comparison and print (and optionally save) the table."""
    args = parse_args()
    torch.set_num_threads(THREADS)
    if args.worker:
        return worker(args)
    print(header(args), flush=True)
    # First, while this process is small: Linux carries the parent's RSS peak into a spawned child's ru_maxrss.
    memory = peak_rss_interleaved(args)
    base = base_model(args)
    ids = token_batch(base.config.vocab_size, args.batch, args.seq, args.device)
    models = {side: with_lora(side, copy.deepcopy(base), args.dropout) for side in SIDES}
    params = {side: trainable(model) for side, model in models.items()}
    steps = time_interleaved({side: train_step(model, ids) for side, model in models.items()}, args.reps)
    unmerged = time_interleaved({"base": eval_forward(base, ids)}
                                | {side: eval_forward(model, ids) for side, model in models.items()}, args.reps)
    models = {side: merged(side, model) for side, model in models.items()}
    merged_ = time_interleaved({"base": eval_forward(base, ids)}
                               | {side: eval_forward(model, ids) for side, model in models.items()}, args.reps)
    results = summarize(params, steps, memory, unmerged, merged_, args.batch * args.seq, memory_kind(args))
    print("\n" + table(results))
    if args.json:
        info = {"command": sys.argv, "cpus": os.cpu_count(), "torch": torch.__version__, "threads": THREADS,
                "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                "args": {k: v for k, v in vars(args).items() if k != "worker"}}
        with open(args.json, "w") as handle:
            json.dump(info | {k: v for k, v in results.items() if k != "rows"}, handle, indent=2)


if __name__ == "__main__":
    main()
