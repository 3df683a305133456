"""Every method on MiniLM-L6 + movie review snippets at one budget: trainable %, accuracy, time, memory.

The protocol of ../shared/ANCHORS.md: label = score > 0, rows shuffled with seed 0, the last
2,000 rows test, max_len 64, batch 32, 300 AdamW steps (weight decay 0.01), 30 warmup steps
then linear decay, the classifier head always trainable, accuracy on the whole test set.
Each method runs in its own process so that its peak RSS is its own.

    python benchmarks/methods_quality.py [--steps 300] [--methods lora_qv,bitfit] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HEAD = ["classifier"]
# name -> (learning rate, callback class name or None for full fine-tuning, its arguments)
METHODS: dict[str, tuple[float, str | None, dict]] = {
    "full": (5e-5, None, {}),
    "head_only": (1e-3, "Selective", {"modules": HEAD}),
    "lora_qv": (5e-4, "LoRA", {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "value"],
                               "modules_to_save": HEAD}),
    "lora_all_linear": (5e-4, "LoRA", {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear",
                                       "exclude_modules": ["pooler.dense"], "modules_to_save": HEAD}),
    "ia3": (3e-3, "IA3", {"target_modules": r".*\.(key|value|layer\.\d+\.output\.dense)",
                          "feedforward_modules": r".*\.layer\.\d+\.output\.dense", "modules_to_save": HEAD}),
    "bitfit": (1e-3, "BitFit", {"modules_to_save": HEAD}),
    "adapter": (1e-3, "Adapter", {"bottleneck_dim": 64, "placement": "houlsby", "modules_to_save": HEAD}),
    "prompt_tuning": (3e-2, "PromptTuning", {"num_virtual_tokens": 20, "modules_to_save": HEAD}),
}


def run_one(name: str, steps: int) -> dict:
    """Train and test one method in this process; return its row."""
    import lightning as L
    import torch

    import lightning_peft
    from lightning_peft.data import TextClassificationData
    from lightning_peft.tasks import SequenceClassification

    torch.set_num_threads(2)
    L.seed_everything(0)
    lr, method, kwargs = METHODS[name]
    callbacks = [getattr(lightning_peft, method)(**kwargs)] if method else []
    task = SequenceClassification("minilm-l6", num_labels=2, learning_rate=lr, warmup_steps=30)
    data = TextClassificationData(source="movie-snippets", max_length=64, batch_size=32, val_fraction=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(task, data)
    fit_seconds = time.perf_counter() - start
    (result,) = trainer.test(task, data, verbose=False)
    summary = lightning_peft.trainable_summary(task)
    return {"method": name, "lr": lr, "trainable": summary.trainable, "percent": summary.percent,
            "test_acc": result["test_acc"], "fit_s": fit_seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_in_subprocess(name: str, steps: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(steps)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], steps: int) -> str:
    lines = [f"MiniLM-L6 + movie review snippets, {steps} steps, batch 32, max_len 64 ({os.cpu_count()} CPUs)",
             "", "| method | lr | trainable | test acc | fit time | peak RSS |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} ({r['percent']:.2f}%) | "
                     f"{r['test_acc']:.4f} | {r['fit_s']:.0f} s | {r['peak_rss_mb']:.0f} MB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps)))
        return
    rows = []
    for name in args.methods.split(","):
        rows.append(run_in_subprocess(name, args.steps))
        print(f"done: {rows[-1]}", file=sys.stderr, flush=True)
    print(table(rows, args.steps))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
