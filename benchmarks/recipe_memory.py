"""Training peak RSS and step time of a recipe: as shipped, without ReleaseFreedMemory, and at an earlier commit.

Each variant runs ``lightning-peft fit --config RECIPE`` for ``--steps`` steps (no validation, one
test batch) in a fresh process, in interleaved rounds; a callback times the training steps after
the first and reads the process's peak RSS when training ends, before the test. ``--before REF`` adds the package as
it was at a git commit (checked out in a temporary worktree) running the same recipe, less the
callbacks that commit does not have.

    python benchmarks/recipe_memory.py --before f6371d1          # about 10 minutes on 2 CPUs
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
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parent.parent
MARK = "step-clock:"


class StepClock(L.Callback):
    """Prints the median training-step time (the first step left out) and the peak RSS so far when training ends."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.start)

    def on_train_end(self, *args) -> None:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(MARK, json.dumps({"step_s": statistics.median(self.times[1:] or self.times), "peak_rss_mib": peak_mib}),
              flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "recipes" / "lora_causal_lm.yaml"))
    parser.add_argument("--before", metavar="REF", help="also run the package as it was at this git commit")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def without_release(config: Path, folder: Path) -> Path:
    """A copy of the recipe without the ReleaseFreedMemory callback."""
    lines = [line for line in config.read_text().splitlines() if "ReleaseFreedMemory" not in line]
    copy = folder / f"no_release_{config.name}"
    copy.write_text("\n".join(lines) + "\n")
    return copy


def run_fit(package_root: Path, config: Path, args: argparse.Namespace, folder: Path) -> dict:
    """One fit in a fresh process: its median step time and its peak RSS up to the end of training."""
    code = ("import sys; from lightning_peft.cli import main; sys.argv[0] = 'lightning-peft'; main()")
    command = [sys.executable, "-c", code, "fit", "--config", str(config), f"--trainer.max_steps={args.steps}",
               "--trainer.limit_val_batches=0", "--trainer.limit_test_batches=1",
               f"--trainer.default_root_dir={folder / 'logs'}", "--trainer.callbacks+=recipe_memory.StepClock"]
    env = dict(os.environ, PYTHONPATH=f"{package_root}{os.pathsep}{Path(__file__).parent}",
               OMP_NUM_THREADS=str(args.threads))
    # cwd not the repository: its package folder would shadow the one PYTHONPATH names
    done = subprocess.run(command, env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fit failed ({done.returncode}): {shlex.join(command)}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith(MARK))[len(MARK):])


def main() -> None:
    args = parse_args()
    config = Path(args.config).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        variants = {"as shipped": (REPO, config), "no ReleaseFreedMemory": (REPO, without_release(config, folder))}
        if args.before:
            worktree = folder / "before"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.before],
                           check=True, capture_output=True)
            variants[f"at {args.before}"] = (worktree, variants["no ReleaseFreedMemory"][1])
        try:
            results = {name: [] for name in variants}
            for round_ in range(args.rounds):
                names = list(variants)[round_ % len(variants):] + list(variants)[:round_ % len(variants)]
                for name in names:
                    print(f"round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                    results[name].append(run_fit(*variants[name], args, folder))
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
    print(report(results, config, args))


def report(results: dict[str, list[dict]], config: Path, args: argparse.Namespace) -> str:
    """A markdown table: median step and peak of each variant, and each against the first."""
    first = next(iter(results.values()))
    lines = [f"- machine: {os.cpu_count()} CPUs, OMP_NUM_THREADS={args.threads}, torch {torch.__version__}",
             f"- command: `python {shlex.join(sys.argv)}`",
             f"- `lightning-peft fit --config {config.name}`, {args.steps} steps, no validation; peak RSS up to "
             f"the end of training (before the test); "
             f"{args.rounds} interleaved rounds, a fresh process each; step: median after the first",
             "", "| variant | step (s) | step / shipped | peak RSS (MiB) | peak / shipped |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        peak = statistics.median(r["peak_rss_mib"] for r in runs)
        lines.append(f"| {name} | {step:.2f} | {step / statistics.median(r['step_s'] for r in first):.3f} "
                     f"| {peak:,.0f} | {peak / statistics.median(r['peak_rss_mib'] for r in first):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
