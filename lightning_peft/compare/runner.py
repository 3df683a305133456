"""``lightning-peft compare``: every method on one recipe's task, each run in its own process, then a report.

Every run gets the same task, data, step budget, batch and seed; only the PEFT method slot of
the recipe (and the method's learning rate) changes. A run that fails or runs out of memory is
a row that says why, and the others go on. A rerun skips the runs whose results are saved.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft
from lightning_peft.builtin_recipes import recipe_path
from lightning_peft.cli_messages import CommandParser
from lightning_peft.compare.methods import (
    METHOD_NAMES,
    CompareError,
    MethodPlan,
    is_method_slot,
    method_slot,
    names_a,
    normalized_callbacks,
    own_method,
    parse_overrides,
    plan_method,
    recipe_rate,
)
from lightning_peft.compare.report import duration, write_report
from lightning_peft.core.files import atomic_write

POLL_S = 0.5
WORKER_GRACE_S = 10  # seconds a stopped compare gives its worker to end before killing it
FORGETTING_SNIPPETS = 2000  # movie review snippets: the other domain of a model tuned on Austen's novels
SWEEP_FACTORS = "0.3,1,3"  # --lr-sweep without a value: each method's own rate, a third of it and three times it
SWEEP_VAL_FRACTION = 0.1  # the training rows a sweep holds out to score on, when the recipe holds none out


def parser() -> argparse.ArgumentParser:
    """The options of ``lightning-peft compare``."""
    p = CommandParser(prog="lightning-peft compare",
                      description="Train every method on one recipe's task (same data, steps, batch and seed), each "
                                  "in its own process, and write report.md/.csv/.json and plots to --out.")
    p.add_argument("--config", required=True, help="a recipe with a PEFT method in trainer.callbacks (file or name)")
    p.add_argument("--methods", required=True, help=f"comma-separated, from: {','.join(METHOD_NAMES)}")
    p.add_argument("--max_steps", type=int, default=None, help="training steps of every run (default: the recipe's)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each method runs once per seed")
    p.add_argument("--out", default=None, help="the report folder (default: compare/RECIPE)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method's setting (an argument of its callback), learning_rate or gradient_clip_val")
    p.add_argument("--lr-sweep", "--lr_sweep", dest="lr_sweep", nargs="?", const=SWEEP_FACTORS, default=None,
                   metavar="FACTORS",
                   help="choose each method's learning rate first: its rate times each factor (default "
                        f"{SWEEP_FACTORS}), each trained for the same steps and scored on a validation split of the "
                        f"training rows ({round(100 * SWEEP_VAL_FRACTION)}%% unless the recipe holds one out); the "
                        "test rows are never used for choosing")
    p.add_argument("--forgetting_text", default=None,
                   help="causal LMs: held-out text of another domain, whose perplexity is measured before and after "
                        "tuning (default for the Austen corpus: the movie review snippets)")
    return p


def compare_main(argv: list[str]) -> None:
    """Plan every run (all mistakes reported before any training), run what is not done, write the report."""
    options = parser().parse_args(argv)
    recipe_file, recipe = read_recipe(options.config)
    method_slot(recipe, options.config)
    methods = _distinct("--methods", [m.strip() for m in options.methods.split(",") if m.strip()],
                        f"from: {','.join(METHOD_NAMES)}")
    seeds = _distinct("--seeds", _seeds(options.seeds), "e.g. 0,1")
    if options.max_steps is not None and options.max_steps < 1:
        raise CompareError(f"--max_steps {options.max_steps}: every run trains at least 1 step")
    factors = _factors(options.lr_sweep) if options.lr_sweep is not None else None
    overrides = parse_overrides(options.set, methods)
    plans = [plan_method(recipe, options.config, method, overrides.get(method, {})) for method in methods]
    out = Path(options.out or Path("compare") / Path(recipe_file).stem)
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file: give a folder for the runs and the report")
    forgetting = forgetting_text(recipe, options.forgetting_text, out)
    started, clock = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    rows = []
    for i, plan in enumerate(plans, 1):
        label = f"[{i}/{len(plans)}]"
        sweep = sweep_rate(recipe, plan, seeds[0], options.max_steps, out, factors, label) if factors else {}
        rows += [run_once(recipe, plan, seed, options.max_steps, out, label, forgetting, sweep) for seed in seeds]
    context = {"command": "lightning-peft compare " + shlex.join(argv), "recipe": options.config,
               "machine": machine(), "versions": versions(), "started": started,
               "wall_s": time.perf_counter() - clock}
    written = write_report(rows, out, context)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"compare: {ok} of {len(rows)} runs ok; report: {written['md']}")
    if not ok:
        raise SystemExit(1)  # the report lists why; a script or CI job sees that nothing trained


def read_recipe(config: str) -> tuple[Path, dict]:
    """The recipe file ``--config`` names, and its content; a CompareError for one that is not a recipe."""
    path = Path(recipe_path(config))
    if path.is_dir() or not path.exists():
        what = f"{config}, a folder" if path.is_dir() else "YAML given inline"
        raise CompareError(f"--config takes a recipe file or a built-in recipe's name (compare and estimate write "
                           f"each run's recipe beside its results); got {what}")
    try:
        recipe = normalized_callbacks(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as err:
        raise CompareError(f"recipe {config} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict):
        raise CompareError(f"recipe {config} has no model: section (a recipe holds model:, data: and trainer: with a "
                           "PEFT method, as the built-in ones do: lightning-peft fit --config lora_sentiment "
                           "--print_config)")
    return path, recipe


def estimate_parser() -> argparse.ArgumentParser:
    """The options of ``lightning-peft estimate``."""
    p = CommandParser(prog="lightning-peft estimate",
                      description="Estimate each method's peak training memory per device before training: "
                                  "weights, gradients and optimizer states by formula, activations from a short probe "
                                  "of the real model on cut-down batches.")
    p.add_argument("--config", required=True, help="a recipe with a PEFT method in trainer.callbacks (file or name)")
    p.add_argument("--methods", default=None, help=f"comma-separated, from: {','.join(METHOD_NAMES)} "
                                                   "(default: the recipe's own method)")
    p.add_argument("--devices", type=int, default=1, help="devices the memory is split across")
    p.add_argument("--strategy", choices=["single", "ddp", "fsdp"], default="single", help="how it is split")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE", help="as for compare")
    return p


def estimate_main(argv: list[str]) -> None:
    """Print each method's estimated peak memory per device, each probed in its own process."""
    options = estimate_parser().parse_args(argv)
    if options.devices < 1:
        raise CompareError(f"--devices {options.devices}: the memory is split across 1 device or more")
    if options.devices > 1 and options.strategy == "single":
        raise CompareError(f"--devices {options.devices} with --strategy single: give --strategy ddp or fsdp, which "
                           "say how the memory is split across them")
    _, recipe = read_recipe(options.config)
    slot = method_slot(recipe, options.config)
    methods = [m.strip() for m in (options.methods or "").split(",") if m.strip()]
    if options.set and not methods:  # --set names a method: the recipe's own, when it is one compare knows
        methods = [own_method(slot)] if own_method(slot) else []
    overrides = parse_overrides(options.set, methods)
    plans = [plan_method(recipe, options.config, m, overrides.get(m, {})) for m in methods] or [
        MethodPlan("recipe", slot, recipe_rate(recipe), (recipe.get("trainer") or {}).get("gradient_clip_val"),
                   options.config)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lightning-peft-estimate-") as folder:
        for i, plan in enumerate(plans, 1):
            run_dir = Path(folder) / plan.method
            prepare_run(recipe, plan, 0, None, run_dir)
            rows.append(run_worker(run_dir, ["--estimate", str(options.devices), options.strategy],
                                   f"[{i}/{len(plans)}] {plan.method}"))
    print(estimate_table(rows, options.devices, options.strategy))
    if not any(row["status"] == "ok" for row in rows):
        raise SystemExit(1)  # as compare: a script sees that nothing was estimated


def estimate_table(rows: list[dict], devices: int, strategy: str) -> str:
    """The estimates as a text table, with the parts they add up from (MiB) and the failed methods' errors."""
    head = (f"{'method':<15}{'weights':>9}{'trained':>9}{'Adam states':>13}{'step':>8}{'runtime':>9}"
            f"{'load peak':>11}{'per device':>12}")
    lines = [f"peak training memory per device (MiB), {devices} device(s), {strategy}", head]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['method']:<15}failed: {row['error']}")
            continue
        trained = row["estimate_trainable"]
        lines.append(f"{row['method']:<15}{row['estimate_weights']:>9.0f}{trained:>9.1f}{2 * trained:>13.1f}"
                     f"{row['estimate_step']:>8.0f}{row['estimate_runtime']:>9.0f}{row['estimate_load_peak']:>11.0f}"
                     f"{row['estimate_mib']:>12.0f}")
    return "\n".join(lines)


def forgetting_text(recipe: dict, given: str | None, out: Path) -> str | None:
    """Other-domain text for a causal LM's forgetting: the file given, else for Austen the movie review snippets."""
    causal = str(recipe["model"].get("class_path", "")).endswith("CausalLM")
    if given is not None:
        if not causal:
            raise CompareError("--forgetting_text is for causal-LM recipes (lightning_peft.tasks.CausalLM)")
        if not Path(given).is_file():
            raise CompareError(f"--forgetting_text {given}: the file does not exist")
        return str(Path(given).resolve())
    if not causal or (recipe.get("data") or {}).get("init_args", {}).get("source") != "austen":
        return None
    from lightning_peft.assets import movie_snippets

    path = out / "forgetting.txt"
    if not path.is_file():
        write_text(path, "\n".join(text for text, _ in movie_snippets()[:FORGETTING_SNIPPETS]) + "\n")
    return str(path.resolve())


def _factors(text: str) -> list[float]:
    try:
        factors = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        factors = []
    if not factors or any(not math.isfinite(f) or f <= 0 for f in factors):
        raise CompareError(f"--lr-sweep {text}: write positive factors of each method's rate, e.g. {SWEEP_FACTORS}")
    return factors


def sweep_rate(recipe: dict, plan: MethodPlan, seed: int, max_steps: int | None, out: Path, factors: list[float],
               label: str) -> dict:
    """Train ``plan`` at its rate times each factor, score each on validation, and set its rate to the best.

    Returns what the method's rows report: each rate tried with its validation score (or error).
    """
    tried = []
    for rate in (plan.learning_rate * f for f in factors):
        candidate = dataclasses.replace(plan, learning_rate=rate)
        run_dir = out / "runs" / f"{plan.method}-lr-sweep" / f"lr{rate:.3g}"
        name = f"{label} {plan.method} learning rate {rate:.3g} (sweep)"
        same = identity(recipe, candidate, seed, max_steps, sweep=True)
        row = _saved_result(run_dir, same) or _sweep_run(recipe, candidate, seed, max_steps, run_dir, name)
        tried.append({"learning_rate": rate, "metric_name": row.get("metric_name"), "metric": row.get("metric"),
                      "higher_is_better": row.get("higher_is_better"), "error": row.get("error")})
        print(f"{name}: " + (f"{row['metric_name']} {row['metric']:.4g}" if row["status"] == "ok" else row["error"]),
              file=sys.stderr)
    scored = [t for t in tried if t["metric"] is not None and math.isfinite(t["metric"])]
    if scored:
        best = max if scored[0]["higher_is_better"] else min
        plan.learning_rate = best(scored, key=lambda t: t["metric"])["learning_rate"]
    return {"lr_sweep": tried}


def _sweep_run(recipe: dict, plan: MethodPlan, seed: int, max_steps: int | None, run_dir: Path, name: str) -> dict:
    prepare_run(recipe, plan, seed, max_steps, run_dir, sweep=True)
    return run_worker(run_dir, [], name)


def _distinct(option: str, values: list, example: str) -> list:
    """``values`` when there are some and none repeats (a repeat would count one run twice), else a CompareError."""
    if not values:
        raise CompareError(f"{option}: name at least one, {example}")
    repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if repeated is not None:
        raise CompareError(f"{option}: {repeated} is named twice; each is run once")
    return values


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CompareError(f"--seeds {text}: write integers separated by commas, e.g. 0,1") from None
    bad = [seed for seed in seeds if not 0 <= seed < 2**32]
    if bad:
        raise CompareError(f"--seeds {text}: a seed is from 0 to 4294967295 (2**32 - 1), not {bad[0]}")
    return seeds


def run_config(recipe: dict, plan: MethodPlan, seed: int, max_steps: int | None, run_dir: Path,
               sweep: bool = False) -> dict:
    """The recipe with ``plan``'s method in its slot, the seed, the step budget, and its outputs in ``run_dir``.

    A sweep's run holds out a validation split of the training rows when the recipe holds none out.
    """
    config = copy.deepcopy(recipe)
    trainer = config.setdefault("trainer", {})
    given = trainer.get("callbacks") or []
    others = [entry for entry in (given if isinstance(given, list) else [given])  # compare's runs keep no checkpoints
              if not is_method_slot(entry) and not names_a(entry, ModelCheckpoint)]
    trainer.update(callbacks=copy.deepcopy(plan.callbacks) + others, default_root_dir=str(run_dir),
                   enable_checkpointing=False, enable_progress_bar=False, gradient_clip_val=plan.gradient_clip_val,
                   devices=1, num_nodes=1, strategy="auto")  # every run on one device, as the report says
    if max_steps is not None:  # the recipe's max_epochs would stop a run first
        trainer.update(max_steps=max_steps, max_epochs=-1)
    config["seed_everything"] = seed
    config["model"].setdefault("init_args", {})["learning_rate"] = plan.learning_rate
    data = config.setdefault("data", {}).setdefault("init_args", {})
    for settings in [data, *(data.get("tasks") or {}).values()]:  # MultiTaskData: each task holds its own split
        if sweep and not settings.get("val_file") and not settings.get("val_fraction", 1):
            settings["val_fraction"] = SWEEP_VAL_FRACTION
    return config


def run_once(recipe: dict, plan: MethodPlan, seed: int, max_steps: int | None, out: Path, label: str,
             forgetting: str | None = None, sweep: dict | None = None) -> dict:
    """One run's result row: saved from an earlier compare, or estimated then trained by fresh worker processes."""
    run_dir = out / "runs" / f"{plan.method}-seed{seed}"
    saved = _saved_result(run_dir, identity(recipe, plan, seed, max_steps, forgetting=forgetting))
    if saved is not None:
        print(f"{label} {plan.method} seed {seed}: done before, kept ({run_dir / 'result.json'})", file=sys.stderr)
        saved.pop("lr_sweep", None)
        return {**saved, **(sweep or {})}  # this call's sweep chose its rate
    prepare_run(recipe, plan, seed, max_steps, run_dir, forgetting=forgetting)
    name = f"{label} {plan.method} seed {seed}"
    guess = run_worker(run_dir, ["--estimate", "1", "single"], f"{name} (memory estimate)")
    row = run_worker(run_dir, [], name)
    if guess["status"] == "ok":
        row.update({k: v for k, v in guess.items() if k.startswith("estimate")})
    row.update(sweep or {})
    write_text(run_dir / "result.json", json.dumps(row, indent=1))
    print(f"{name}: {row['status']}" + (f": {row['error']}" if row.get("error") else ""), file=sys.stderr)
    return row


def identity(recipe: dict, plan: MethodPlan, seed: int, max_steps: int | None, sweep: bool = False,
             forgetting: str | None = None) -> dict:
    """What makes two runs the same run: a saved result is kept only when these match.

    ``run``: a digest of the run's whole config (model, data, batch, steps, the method's settings),
    of the size and time of change of each data file and of each file in a local model folder, and
    of the machine and library versions, so an edited recipe, file or model trains again, and so
    does a run on another machine (its times and memory are another machine's).
    """
    config = run_config(recipe, plan, seed, max_steps, Path("."), sweep)
    del config["trainer"]["default_root_dir"]
    named = [forgetting, *_strings(config.get("data")), *_strings(config.get("model"))]  # MultiTaskData: a level down
    files = [p for f in named if isinstance(f, str) for p in _files_at(Path(f))]
    stats = [(str(f), *_changed(f)) for f in files]
    digest = hashlib.sha256(json.dumps([config, stats, machine(), versions()], sort_keys=True,
                                       default=str).encode()).hexdigest()[:16]
    return {"method": plan.method, "seed": seed, "learning_rate": plan.learning_rate, "settings_from": plan.source,
            "overrides": plan.overrides, "max_steps": max_steps, "run": digest}


def _strings(value: object) -> list[str]:
    """Every string anywhere in a recipe section (its file paths among them)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def _files_at(path: Path) -> list[Path]:
    """``path`` if it is a file, the files of a folder (a model's: weights, config, tokenizer), else none."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []


def _changed(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def prepare_run(recipe: dict, plan: MethodPlan, seed: int, max_steps: int | None, run_dir: Path,
                forgetting: str | None = None, sweep: bool = False) -> None:
    """Write the run's recipe and identity into ``run_dir``, removing what an earlier attempt left."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for leftover in ("progress.json", "result.json", "estimate.json"):
        (run_dir / leftover).unlink(missing_ok=True)
    about = {**identity(recipe, plan, seed, max_steps, sweep, forgetting), "forgetting_text": forgetting,
             "sweep": sweep}
    write_text(run_dir / "plan.json", json.dumps(about, indent=1))
    write_text(run_dir / "config.yaml", yaml.safe_dump(run_config(recipe, plan, seed, max_steps, run_dir, sweep),
                                                        sort_keys=False))


def run_worker(run_dir: Path, args: list[str], label: str) -> dict:
    """Run a worker process on ``run_dir`` (training, or with ``--estimate`` the estimate) and return its row."""
    estimating = bool(args)
    target = run_dir / ("estimate.json" if estimating else "result.json")
    log = run_dir / ("estimate.log" if estimating else "log.txt")
    with open(log, "w") as stream:
        worker = subprocess.Popen([sys.executable, "-m", "lightning_peft.compare.worker", str(run_dir), *args],
                                  stdout=stream, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            with _terminated_as_interrupt():
                code = watch(worker, run_dir / "progress.json", label, sys.stderr)
        finally:  # compare stopped (Ctrl-C, a job's time limit): its worker stops too, not training on alone
            _stop(worker)
    if target.is_file():
        return json.loads(target.read_text())
    return {**json.loads((run_dir / "plan.json").read_text()), "status": "failed", "error": died(code, log)}


@contextlib.contextmanager
def _terminated_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM (a scheduler's stop) raises KeyboardInterrupt, so cleanup runs (main thread only)."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _stop(worker: subprocess.Popen) -> None:
    """End ``worker`` if it still runs: SIGTERM, then SIGKILL after a grace period."""
    if worker.poll() is not None:
        return
    worker.terminate()
    try:
        worker.wait(timeout=WORKER_GRACE_S)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _saved_result(run_dir: Path, same: dict) -> dict | None:
    """The row of the same run finished before; a failed, unreadable or differently set one is run again."""
    try:
        row = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return row if row.get("status") == "ok" and all(row.get(k) == v for k, v in same.items()) else None


def watch(worker: subprocess.Popen, progress: Path, label: str, stream: TextIO) -> int:
    """Show the worker's step and ETA until it ends (one line redrawn on a terminal, a line per 10% else)."""
    shown = -1
    while worker.poll() is None:
        time.sleep(POLL_S)
        try:
            state = json.loads(progress.read_text())
        except (OSError, ValueError):
            continue
        step, total, elapsed = state["step"], state["max_steps"], state["elapsed_s"]
        eta = f", ETA {duration(elapsed / step * (total - step))}" if step and total > 0 else ""
        line = f"{label}: step {step}/{total if total > 0 else '?'}{eta}"
        if stream.isatty():
            print(f"\r{line}\033[K", end="", file=stream, flush=True)
        elif total > 0 and step * 10 // total > shown:
            shown = step * 10 // total
            print(line, file=stream, flush=True)
    if stream.isatty():
        print("\r\033[K", end="", file=stream)
    return worker.returncode


def died(code: int, log: Path) -> str:
    """Why a worker ended without a result: the signal that killed it, or its log's last line."""
    if code < 0:
        name = signal.Signals(-code).name
        return f"the run was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    return f"the run ended with exit code {code}" + (f": {lines[-1].strip()}" if lines else "")


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def machine() -> str:
    """The machine in a few words: CPUs, and the GPU when there is one."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} CPUs ({platform.machine()}), {platform.system()}{gpu}"


def versions() -> dict[str, str]:
    """Versions of what the numbers depend on."""
    import lightning
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "transformers": transformers.__version__, "lightning-peft": lightning_peft.__version__}
