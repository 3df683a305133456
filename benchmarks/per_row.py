"""Serving several adapters in one batch: per-row routing against one adapter for all rows and against switching.

Four LoRA adapters (r=8 on the attention's q, k, v, o) on one base; a batch of 32 rows, 8 per
adapter. Inference throughput (rows per second, no_grad, eval) of:

- single: one adapter for all 32 rows (what a batch of one task costs);
- per-row: the 4 x 8 batch in one forward under ``per_row_adapters`` (peft: ``adapter_names=``);
- sequential: the four sub-batches of 8 one after another, ``set_adapter`` before each.

Ours and peft's are built on identical base weights in the same process and timed in interleaved
rounds; each figure is the median over rounds.

    python benchmarks/per_row.py --model minilm          # MiniLM-L6, 64 tokens a row
    python benchmarks/per_row.py --model smollm2         # SmolLM2-135M, 128 tokens a row
    python benchmarks/per_row.py --model tiny --rounds 2 # a tiny random Llama, seconds
    python benchmarks/per_row.py --model minilm --device cuda --dtype bfloat16 --random-weights   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lightning_peft import LoRA, per_row_adapters, set_adapter

ADAPTERS, ROWS_EACH, R, ALPHA, THREADS = 4, 8, 8, 16, 2
TARGETS = {"minilm": ["query", "key", "value", "attention.output.dense"],
           "smollm2": ["q_proj", "k_proj", "v_proj", "o_proj"], "tiny": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LENGTHS = {"minilm": 64, "smollm2": 128, "tiny": 32}


def base_model(name: str, random_weights: bool = False) -> nn.Module:
    """The base at float32 on the CPU; ``random_weights``: the same architecture at seed 0 (no asset needed)."""
    if name == "minilm" and random_weights:
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(  # all-MiniLM-L6-v2's config.json
            vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
            max_position_embeddings=512, num_labels=2))
    if name == "minilm":
        from transformers import AutoModelForSequenceClassification

        from lightning_peft.assets import minilm_path

        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    if name == "smollm2":
        from models import smollm2

        return smollm2(random_weights=random_weights)
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def ours(base: nn.Module, targets: list[str], names: list[str]) -> nn.Module:
    model = copy.deepcopy(base)
    for name in names:
        LoRA(r=R, alpha=ALPHA, target_modules=targets, adapter_name=name).inject(model)
    return model.eval()


def peers(base: nn.Module, targets: list[str], names: list[str]) -> nn.Module:
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    return model.eval()


def same_random_adapters(ours_model: nn.Module, peft_model: nn.Module) -> None:
    """Give every adapter random A and B, the same on both sides, so each adapter changes the output."""
    theirs = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, param in ours_model.named_parameters():
            if ".adapters." in name:
                param.normal_(0, 0.02)
                layer, rest = name.split(".adapters.")
                adapter, tensor = rest.split(".")
                theirs[f"base_model.model.{layer}.{tensor}.{adapter}.weight"].copy_(param)


def timed(step: Callable[[], object]) -> float:
    """Seconds of one call, the GPU's queue drained before and after."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        step()
    synchronize()
    return time.perf_counter() - start


def variants(model: nn.Module, peft_model: nn.Module, batch: dict, names: list[str], rows: list[str]) -> dict:
    """Each variant as a call that serves the 32 rows once."""
    def sub(i: int) -> dict:
        return {k: v[i * ROWS_EACH:(i + 1) * ROWS_EACH] for k, v in batch.items()}

    def ours_single():
        set_adapter(model, names[0])
        model(**batch)

    def ours_per_row():
        with per_row_adapters(model, rows):
            model(**batch)

    def ours_sequential():
        for i, name in enumerate(names):
            set_adapter(model, name)
            model(**sub(i))

    def peft_single():
        peft_model.set_adapter(names[0])
        peft_model(**batch)

    def peft_per_row():
        peft_model(**batch, adapter_names=rows)

    def peft_sequential():
        for i, name in enumerate(names):
            peft_model.set_adapter(name)
            peft_model(**sub(i))

    return {"ours single": ours_single, "ours per-row": ours_per_row, "ours sequential": ours_sequential,
            "peft single": peft_single, "peft per-row": peft_per_row, "peft sequential": peft_sequential}


def check_outputs_agree(model: nn.Module, peft_model: nn.Module, batch: dict, rows: list[str]) -> float:
    """The largest difference between our per-row logits and peft's mixed-batch logits (same weights)."""
    with torch.no_grad(), per_row_adapters(model, rows):
        mine = model(**batch).logits
    with torch.no_grad():
        theirs = peft_model(**batch, adapter_names=rows).logits
    return float((mine - theirs).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(TARGETS), default="minilm")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--length", type=int, help="tokens a row (default: 64 MiniLM, 128 SmolLM2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--random-weights", action="store_true", help="the model's architecture at random (no asset)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    base = base_model(args.model, args.random_weights).to(args.device, getattr(torch, args.dtype)).eval()
    names = [f"task{i}" for i in range(ADAPTERS)]
    model, peft_model = ours(base, TARGETS[args.model], names), peers(base, TARGETS[args.model], names)
    del base
    same_random_adapters(model, peft_model)
    length = args.length or LENGTHS[args.model]
    rows = [name for name in names for _ in range(ROWS_EACH)]
    batch = {"input_ids": torch.randint(5, 500, (len(rows), length), device=args.device),
             "attention_mask": torch.ones(len(rows), length, dtype=torch.long, device=args.device)}
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {THREADS} threads"
    print(f"{args.model}{' (random weights)' if args.random_weights else ''}, {args.dtype}: {ADAPTERS} LoRA adapters "
          f"(r={R}, {', '.join(TARGETS[args.model])}), batch {len(rows)} = {ADAPTERS} x {ROWS_EACH} rows of {length} "
          f"tokens, {where}, {args.rounds} rounds")
    difference = check_outputs_agree(model, peft_model, batch, rows)
    print(f"our per-row logits vs peft's mixed batch: max |diff| {difference:.2e}")
    calls = variants(model, peft_model, batch, names, rows)
    for call in calls.values():  # warm-up
        timed(call)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(args.rounds):
        order = list(calls)[round_index % len(calls):] + list(calls)[:round_index % len(calls)]
        for name in order:
            seconds[name].append(timed(calls[name]))
    throughput = {name: len(rows) / statistics.median(times) for name, times in seconds.items()}
    print("\n| variant | rows/s | vs its single | per-row vs its sequential |\n| --- | ---: | ---: | ---: |")
    for name, value in throughput.items():
        side = name.split()[0]
        single = value / throughput[f"{side} single"]
        over_sequential = (f"{throughput[name] / throughput[f'{side} sequential']:.2f}x" if "per-row" in name
                           else "")
        print(f"| {name} | {value:.1f} | {single:.2f}x | {over_sequential} |")
    print(f"\nour per-row / peft's per-row: {throughput['ours per-row'] / throughput['peft per-row']:.2f}x")


if __name__ == "__main__":
    main()
