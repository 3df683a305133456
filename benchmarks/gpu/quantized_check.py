"""QuantizeBase (int8, nf4, fp4) + LoRA on one device, checked in one go: the QLoRA path users run on a GPU.

    python benchmarks/gpu/quantized_check.py                       # SmolLM2-135M on CUDA, bf16 compute, ~1 min
    python benchmarks/gpu/quantized_check.py --device cpu --quick  # a tiny random Llama: the script's own test

For each mode, in a Lightning Trainer with ``QuantizeBase(mode, compute_dtype=bf16)`` and LoRA on
q/k/v/o: the base is quantized on the device it trains on; the loss falls over a few steps on a
fixed batch; a checkpoint holds the adapter only; merged and unmerged logits agree within 3x the
quantization error (merging rounds W + BA afresh: an error of the same order); the quantized weights take the bytes
the format promises against fp16. One PASS or FAIL line per check; exit code 1 if any failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared model loader

import lightning as L  # noqa: E402
import torch  # noqa: E402
from models import smollm2  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_peft import LoRA, QuantizeBase, disable_adapters, merge  # noqa: E402
from lightning_peft.core.weights import is_quantized, statistics_bytes  # noqa: E402

MODES = ("int8", "nf4", "fp4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BYTES_PER_FP16_WEIGHT = {"int8": (0.50, 0.55), "nf4": (0.25, 0.32), "fp4": (0.25, 0.32)}  # quantized / fp16 bytes
MERGE_TOLERANCE = 3.0  # times the quantization error of the logits: merging rounds W + BA once more, an error of
# the same size (two independent roundings: about 1.4x, more through 30 layers); a broken merge is far beyond


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES))
    parser.add_argument("--random-weights", action="store_true",
                        help="SmolLM2-135M's architecture at random (where the asset cannot be installed)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    args.modes = args.modes.split(",")
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r}; modes: {', '.join(MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (use --device cpu --quick for the script's own test)")
    return args


def base_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    if args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return smollm2(random_weights=args.random_weights)


class FixedBatch(L.LightningModule):
    """A causal LM trained on one fixed batch (so the loss must fall), recording its losses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.losses = model, []

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-3)


def token_batches(vocab: int, steps: int, batch: int = 4, seq: int = 32) -> DataLoader:
    """``steps`` batches that are all the same ``batch`` rows of random tokens."""
    ids = torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return DataLoader(ids.repeat(steps, 1), batch_size=batch)


def check(results: list[dict], ok: bool, what: str, **figures: float) -> None:
    results.append({"check": what, "passed": bool(ok), **figures})
    shown = ", ".join(f"{k}={v:.4g}" for k, v in figures.items())
    print(f"{'PASS' if ok else 'FAIL'} {what}" + (f" ({shown})" if shown else ""), flush=True)


def run_mode(mode: str, args: argparse.Namespace, base: nn.Module, out: Path, results: list[dict]) -> None:
    device = torch.device(args.device)
    model = copy.deepcopy(base)
    probe = next(iter(token_batches(base.config.vocab_size, 1))).to(device)
    with torch.no_grad():
        full_precision = base.to(device)(input_ids=probe).logits.float()
    base.to("cpu")
    compute = None if mode == "int8" else "bfloat16"  # int8 computes in the input's dtype
    module = FixedBatch(model)
    trainer = L.Trainer(accelerator=args.device, devices=1, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[QuantizeBase(mode, compute_dtype=compute), LoRA(r=8, target_modules=TARGETS)])
    trainer.fit(module, token_batches(base.config.vocab_size, args.steps))
    layers = [(name, layer) for name, layer in module.named_modules() if is_quantized(layer)]
    check(results, bool(layers) and all(layer.weight.device.type == device.type for _, layer in layers),
          f"{mode}: {len(layers)} layers quantized on {device.type}")
    first, last = sum(module.losses[:3]) / 3, sum(module.losses[-3:]) / 3
    check(results, last < 0.97 * first, f"{mode}: the loss falls over {args.steps} steps", first=first, last=last)

    trainer.save_checkpoint(out / f"{mode}.ckpt")
    saved = torch.load(out / f"{mode}.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    check(results, bool(saved) and all(".adapters." in key for key in saved),
          f"{mode}: the checkpoint holds the adapter only", tensors=len(saved),
          kib=(out / f"{mode}.ckpt").stat().st_size / 1024)

    module.eval()
    with torch.no_grad():
        with disable_adapters(module.model):
            quantized = module.model(input_ids=probe).logits.float()
        unmerged = module.model(input_ids=probe).logits.float()
        merge(module.model)
        merged = module.model(input_ids=probe).logits.float()
    quantization_error = (quantized - full_precision).abs().max().item()
    merge_error = (merged - unmerged).abs().max().item()
    check(results, merge_error <= MERGE_TOLERANCE * quantization_error,
          f"{mode}: merged and unmerged logits within {MERGE_TOLERANCE}x the quantization error",
          merge_error=merge_error, quantization_error=quantization_error)

    stored = sum(layer.weight.numel() * layer.weight.element_size() + statistics_bytes(layer) for _, layer in layers)
    ratio = stored / sum(2 * layer.in_features * layer.out_features for _, layer in layers)
    low, high = BYTES_PER_FP16_WEIGHT[mode]
    check(results, low <= ratio <= high, f"{mode}: quantized bytes / fp16 bytes in [{low}, {high}]", ratio=ratio)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    base = base_model(args)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        for mode in args.modes:
            run_mode(mode, args, base, Path(folder), results)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "device": args.device, "torch": torch.__version__,
                                               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                                               "results": results}, indent=2))
    failed = [r["check"] for r in results if not r["passed"]]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
