"""Every method on MiniLM-L6 + movie review snippets at one budget: trainable %, accuracy, time, memory.

Each row is a recipe in recipes/ run as ``lightning-peft fit --config`` runs it (the same CLI,
seed and settings), so a recipe's opening comment and this table report the same run. The
protocol is ../shared/ANCHORS.md's: label = score > 0, rows shuffled with seed 0, the last 2,000
rows test, max_len 64, batch 32, 300 AdamW steps (weight decay 0.01), 30 warmup steps then
linear decay, the classifier head always trainable, accuracy on the whole test set. Each run
is its own process, so its peak RSS is its own.

    python benchmarks/methods_quality.py                       # the table, about 40 minutes on 2 cores
    python benchmarks/methods_quality.py --methods lora,bitfit --json out.json
    python benchmarks/methods_quality.py --methods ia3 --lrs 3e-3,1e-2 --jobs 2 --threads 1
    python benchmarks/methods_quality.py --methods bitfit --lrs 1e-2 --set trainer.gradient_clip_val=1.0
    python benchmarks/methods_quality.py --methods lora,ia3,prompt_tuning --peer   # side by side with peft

``--lrs`` tunes instead: it trains on 90% of the training rows at each learning rate and reports
the accuracy on the held-out 10% (the test rows stay unseen), to choose a recipe's rate.
``--set KEY=VALUE`` overrides any recipe setting the way ``lightning-peft fit`` does.
``--peer`` also runs Hugging Face peft's version of each method it has (LoRA, IA3, prompt
tuning) in the same Lightning task, data and trainer, one process each, alternating with ours,
and prints a second table of the ratios: ours / peft.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
METHODS = {  # table row -> recipe
    "full": "full_finetune_sentiment.yaml",
    "head_only": "head_only_sentiment.yaml",
    "lora": "lora_sentiment.yaml",
    "ia3": "ia3_sentiment.yaml",
    "bitfit": "bitfit_sentiment.yaml",
    "adapter": "adapter_sentiment.yaml",
    "prompt_tuning": "prompt_tuning_sentiment.yaml",
}
PEER_METHODS = ("lora", "ia3", "prompt_tuning")  # the rows peft has a version of (--peer)
QUIET = ["--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false"]


def peft_config(callback: Any) -> Any:
    """peft's config that trains what our ``callback`` trains, from its settings; None where peft has no such method."""
    import peft

    from lightning_peft import IA3, LoRA, PromptTuning

    extra = {"task_type": "SEQ_CLS", "modules_to_save": callback.modules_to_save or None}
    if isinstance(callback, LoRA) and not (callback.use_dora or callback.use_rslora) and callback.layers is None:
        return peft.LoraConfig(r=callback.r, lora_alpha=callback.alpha, lora_dropout=callback.dropout,
                               target_modules=callback.target_modules, **extra)
    if isinstance(callback, IA3) and callback.layers is None:
        return peft.IA3Config(target_modules=callback.target_modules,
                              feedforward_modules=callback.feedforward_modules, **extra)
    if isinstance(callback, PromptTuning) and callback.init == "random":
        return peft.PromptTuningConfig(num_virtual_tokens=callback.num_virtual_tokens, **extra)
    return None


class PeftPeer(L.Callback):
    """Wrap the task's model with ``peft.get_peft_model`` at setup, as a Lightning user of peft would."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import peft
        import torch

        if isinstance(pl_module.model, peft.PeftModel):  # test after fit runs setup again: wrap once
            return
        pl_module.configure_model()  # builds the model now (the data module is set up); Lightning's call is a no-op
        # get_peft_model draws from torch's generator even where the method has no random init (IA3):
        # keep the stream ours sees, so both runs get the same dropout masks and batches.
        state = torch.get_rng_state()
        pl_module.model = peft.get_peft_model(pl_module.model, self.config)
        torch.set_rng_state(state)


def with_peer(cli: Any) -> None:
    """Replace the recipe's one lightning-peft callback by peft's version of the method."""
    from lightning_peft.lightning.callback import PEFTCallback

    (ours,) = [c for c in cli.trainer.callbacks if isinstance(c, PEFTCallback)]
    config = peft_config(ours)
    if config is None:
        raise ValueError(f"peft has no counterpart of {type(ours).__name__} with these settings")
    cli.trainer.callbacks[cli.trainer.callbacks.index(ours)] = PeftPeer(config)


def run_one(name: str, lr: float | None, peer: bool, options: Namespace) -> dict:
    """Fit one recipe in this process (on 90% of train when ``lr`` is given), then evaluate."""
    import torch

    from lightning_peft import trainable_summary
    from lightning_peft.cli import build_cli

    torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"--model.init_args.learning_rate={lr}", "--data.init_args.val_fraction=0.1"] if lr is not None else []
        extra += [f"--trainer.max_steps={options.steps}"] if options.steps else []
        extra += [f"--{override}" for override in options.set]
        cli = build_cli(["--config", str(RECIPES / METHODS[name]), *QUIET, f"--trainer.default_root_dir={tmp}",
                         *extra], run=False)
        if peer:
            with_peer(cli)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        fit_seconds = time.perf_counter() - start
        cli.trainer.limit_val_batches = 1.0  # the recipes skip validation during fit; tuning validates at the end
        evaluate = cli.trainer.validate if lr is not None else cli.trainer.test
        (metrics,) = evaluate(cli.model, datamodule=cli.datamodule, verbose=False)
    summary = trainable_summary(cli.model)
    return {"method": name, "library": "peft" if peer else "lightning-peft", "lr": cli.model.hparams.learning_rate,
            "overrides": list(options.set), "trainable": summary.trainable, "percent": summary.percent,
            **{k: v for k, v in metrics.items() if k.endswith("_acc")},
            "fit_s": fit_seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_in_subprocess(name: str, lr: float | None, peer: bool, options: Namespace) -> dict:
    """``run_one`` in a fresh process; its row."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, __file__, "--one", name, "--threads", str(options.threads)]
    command += ["--lr", str(lr)] if lr is not None else []
    command += ["--steps", str(options.steps)] if options.steps else []
    command += [arg for override in options.set for arg in ("--set", override)] + (["--peer"] if peer else [])
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"done: {row}", file=sys.stderr, flush=True)
    return row


def table(rows: list[dict], metric: str) -> str:
    """Markdown table of the rows, and each accuracy's distance to full fine-tuning when it ran."""
    full = next((r[metric] for r in rows if r["method"] == "full"), None)
    lines = [f"| method | library | recipe | lr | trainable | {metric.replace('_', ' ')} | vs full | fit time | "
             "peak RSS |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        gap = f"{100 * (r[metric] - full):+.1f} pts" if full is not None else "-"
        recipe = " ".join([METHODS[r["method"]], *(f"+ {o}" for o in r["overrides"])])
        lines.append(f"| {r['method']} | {r['library']} | {recipe} | {r['lr']:g} | "
                     f"{r['trainable']:,} ({r['percent']:.3f}%) | {r[metric]:.4f} | {gap} | {r['fit_s']:.0f} s | "
                     f"{r['peak_rss_mb']:.0f} MB |")
    return "\n".join(lines)


def ratio_table(rows: list[dict], metric: str) -> str:
    """Ours against peft's run of the same method: accuracy difference, fit time and peak RSS ratios."""
    lines = [f"| method | {metric.replace('_', ' ')} ours / peft | fit time ours / peft | ratio | "
             "peak RSS ours / peft | ratio |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for ours in (r for r in rows if r["library"] == "lightning-peft"):
        same = [r for r in rows if r["library"] == "peft" and (r["method"], r["lr"]) == (ours["method"], ours["lr"])]
        for theirs in same[:1]:
            lines.append(f"| {ours['method']} | {ours[metric]:.4f} / {theirs[metric]:.4f} | "
                         f"{ours['fit_s']:.0f} / {theirs['fit_s']:.0f} s | {ours['fit_s'] / theirs['fit_s']:.2f}x | "
                         f"{ours['peak_rss_mb']:.0f} / {theirs['peak_rss_mb']:.0f} MB | "
                         f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--lrs", help="comma-separated learning rates to compare on a validation split")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (timings are only fair with 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--steps", type=int, help="optimizer steps instead of the recipes' 300 (a quick check)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe setting, e.g. trainer.gradient_clip_val=1.0 (repeatable)")
    parser.add_argument("--peer", action="store_true", help=f"also run peft's {', '.join(PEER_METHODS)}, side by side")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return print(json.dumps(run_one(args.one, args.lr, args.peer, args)))
    names = args.methods.split(",")
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    lrs = [float(lr) for lr in args.lrs.split(",")] if args.lrs else [None]
    libraries = [False, True] if args.peer else [False]
    runs = [(name, lr, peer) for name in names for lr in lrs for peer in libraries
            if not peer or name in PEER_METHODS]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda run: run_in_subprocess(*run, args), runs))
    metric = "val_acc" if args.lrs else "test_acc"
    print(f"MiniLM-L6 + movie review snippets, {args.steps or 300} steps, batch 32, max_len 64; {os.cpu_count()} CPUs, "
          f"{args.threads} torch threads, {args.jobs} run(s) at once\n")
    print(table(rows, metric))
    if args.peer:
        print("\n" + ratio_table(rows, metric))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
