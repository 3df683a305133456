"""Peak memory and step time of LoRA on a full-precision, an 8-bit and a 4-bit base: ours next to peft's path.

Six configurations train LoRA r=8 (alpha 16, no dropout) on q/k/v/o with AdamW on one fixed
random token batch: the base in fp32, in int8 and in nf4 (double quantization, fp32 compute),
once with lightning-peft (``from_pretrained`` in fp32, then ``QuantizeBase`` layer by layer, then
``LoRA``) and once with transformers' ``BitsAndBytesConfig`` + peft's ``get_peft_model``. Each
configuration runs in its own subprocess, which reports its peak RSS (``ru_maxrss``) after setup
and after training, and its median step time; rounds alternate the order of the configurations.

    python benchmarks/qlora_memory.py --quick       # small random Llama, batch 2 x seq 32, about a minute
    python benchmarks/qlora_memory.py               # SmolLM2-135M, batch 8 x seq 128, about 10 minutes
    python benchmarks/qlora_memory.py --mmap-threshold 131072   # the same, glibc's mmap threshold fixed
    python benchmarks/qlora_memory.py --gradient-checkpointing   # activations recomputed: the weights dominate

glibc raises its mmap threshold as large blocks are freed, after which freed activations and
temporaries stay in its heap and in RSS; ``--mmap-threshold`` sets ``MALLOC_MMAP_THRESHOLD_``
for every configuration alike, which fixes the threshold (blocks above it go back to the OS).

The parent process imports neither torch nor transformers: Linux carries a parent's RSS peak
into the ``ru_maxrss`` of the children it spawns, so it must stay smaller than any of them.
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
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
R, ALPHA = 8, 16
THREADS = 2
CONFIGS = ("ours-fp32", "ours-int8", "ours-nf4", "peft-fp32", "peft-int8", "peft-nf4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small random Llama, batch 2 x seq 32")
    parser.add_argument("--batch", type=int, help="default 8 (2 with --quick)")
    parser.add_argument("--seq", type=int, help="default 128 (32 with --quick)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per subprocess, after 1 warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="subprocesses per configuration")
    parser.add_argument("--mmap-threshold", type=int, metavar="BYTES",
                        help="run every configuration with MALLOC_MMAP_THRESHOLD_=BYTES")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each block's activations in backward (non-reentrant), in every configuration")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated configurations to run (default: all of {', '.join(CONFIGS)})")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers to this JSON file")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: one measured subprocess
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)  # internal: the model folder the workers load
    parser.add_argument("--save-quick-model", metavar="DIR", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    args.configs = tuple(c.strip() for c in args.configs.split(","))
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}; there are {', '.join(CONFIGS)}")
    args.batch = args.batch or (2 if args.quick else 8)
    args.seq = args.seq or (32 if args.quick else 128)
    return args


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_quick_model(folder: str) -> None:
    """Save a small random Llama (tied embeddings, fixed seed) as a transformers folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)


def load_ours(folder: str, mode: str):
    """fp32 from_pretrained, then (unless fp32) QuantizeBase layer by layer, then LoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    from lightning_peft import LoRA
    from lightning_peft.quantization import QuantizeBase

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if mode != "fp32":
        QuantizeBase(mode, double_quant=True).inject(model)
    torch.manual_seed(1)
    return LoRA(r=R, alpha=ALPHA, target_modules=TARGETS).inject(model)


def load_peft(folder: str, mode: str):
    """from_pretrained with transformers' BitsAndBytesConfig (unless fp32), then peft's get_peft_model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = {
        "fp32": None,
        "int8": BitsAndBytesConfig(load_in_8bit=True),
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32),
    }[mode]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=quantization)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))


def frozen_bytes(model) -> int:
    """Bytes of the frozen parameters, bitsandbytes statistics included: the same count for both libraries."""
    from lightning_peft.quantization import is_quantized, statistics_bytes

    params = sum(p.nbytes for p in model.parameters() if not p.requires_grad)
    return params + sum(statistics_bytes(m) for m in model.modules() if is_quantized(m))


def worker(args: argparse.Namespace) -> dict:
    """Subprocess body: set one configuration up, train it, and measure."""
    import torch

    torch.set_num_threads(THREADS)
    library, mode = args.worker.split("-")
    start = time.perf_counter()
    model = (load_ours if library == "ours" else load_peft)(args.model_dir, mode)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    setup_s, setup_peak = time.perf_counter() - start, peak_rss_mib()
    ids = torch.randint(model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"setup_s": setup_s, "setup_peak_mib": setup_peak, "peak_mib": peak_rss_mib(),
            "step_s": statistics.median(times[1:]), "frozen_mb": frozen_bytes(model) / 1e6}


def run_worker(config: str, model_dir: str, args: argparse.Namespace) -> dict:
    """One configuration in a fresh subprocess; its JSON line of measurements."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", config, "--model-dir", model_dir,
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    env = dict(os.environ)
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(out.splitlines()[-1])


def measure(model_dir: str, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every configuration ``--rounds`` times, reversing the order every other round."""
    results: dict[str, list[dict]] = {config: [] for config in args.configs}
    for rnd in range(args.rounds):
        for config in args.configs if rnd % 2 == 0 else args.configs[::-1]:
            results[config].append(run_worker(config, model_dir, args))
            print(f"round {rnd + 1}, {config}: {json.dumps(results[config][-1])}", file=sys.stderr, flush=True)
    return results


def table(results: dict[str, list[dict]]) -> str:
    """The markdown table: medians per configuration, and ratios to fp32 LoRA and to peft's same base."""
    med = {config: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
           for config, runs in results.items()}
    rows = ["| configuration | frozen weights (MB) | setup peak RSS (MiB) | training peak RSS (MiB) "
            "| peak / ours fp32 | peak / peft same base | step (s) | step / peft same base |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for config in med:
        m, peer = med[config], med.get("peft-" + config.split("-")[1])
        vs_fp32 = f"{m['peak_mib'] / med['ours-fp32']['peak_mib']:.3f}" if "ours-fp32" in med else ""
        vs_peer_peak = f"{m['peak_mib'] / peer['peak_mib']:.3f}" if peer else ""
        vs_peer_step = f"{m['step_s'] / peer['step_s']:.3f}" if peer else ""
        rows.append(f"| {config} | {m['frozen_mb']:.0f} | {m['setup_peak_mib']:.0f} | {m['peak_mib']:.0f} "
                    f"| {vs_fp32} | {vs_peer_peak} | {m['step_s']:.3f} | {vs_peer_step} |")
    return "\n".join(rows)


def header(args: argparse.Namespace) -> str:
    """Settings and command, as markdown lines."""
    model = "random Llama (hidden 256, 4 layers, vocab 8192, tied)" if args.quick else "SmolLM2-135M-Instruct"
    return "\n".join([
        f"- {model}; LoRA r={R} alpha={ALPHA} dropout 0 on {'/'.join(TARGETS)}; AdamW; batch {args.batch} x seq "
        f"{args.seq}; {os.cpu_count()} CPUs, {THREADS} torch threads",
        f"- median of {args.rounds} subprocesses per configuration; step: median of {args.steps} after 1 warm-up; "
        "peak RSS: ru_maxrss of the whole process, after setup (load + quantize + adapter) and after training; "
        + (f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold is not None
           else "glibc's default (dynamic) mmap threshold")
        + ("; gradient checkpointing (non-reentrant)" if args.gradient_checkpointing else ""),
        f"- command: `python {shlex.join(sys.argv)}`",
    ])


def main() -> None:
    """Run every configuration and print (and optionally save) the table."""
    args = parse_args()
    if args.save_quick_model:
        return save_quick_model(args.save_quick_model)
    if args.worker:
        return print(json.dumps(worker(args)))
    print(header(args), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            model_dir = os.path.join(tmp, "quick-llama")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--save-quick-model", model_dir], check=True)
        else:
            model_dir = subprocess.run([sys.executable, "-c", "from lightning_peft.assets import smollm2_path; "
                                        "print(smollm2_path())"], check=True, stdout=subprocess.PIPE,
                                       text=True).stdout.strip().splitlines()[-1]
        results = measure(model_dir, args)
    print("\n" + table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": sys.argv, "args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
