"""One real run: the main recipe, MiniLM-L6 + LoRA r=8 on the movie review snippets (ANCHORS.md's protocol).

Minutes, not seconds: the only test that trains a real pretrained model on real data.
"""

import time
from pathlib import Path

import pytest
import torch

from lightning_peft import trainable_summary
from lightning_peft.cli import build_cli

RECIPE = Path(__file__).parent.parent / "recipes" / "lora_sentiment.yaml"
MAX_STEPS = 300  # the recipe's


@pytest.fixture
def two_threads():
    """conftest pins one thread for the tiny models; this run is real work for both cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_main_recipe_reaches_080_on_movie_snippets(two_threads, tmp_path):
    """recipes/lora_sentiment.yaml (the main job), as `lightning-peft fit --config` builds it."""
    cli = build_cli(["--config", str(RECIPE), "--trainer.enable_progress_bar=false",
                     "--trainer.enable_checkpointing=false",
                     f"--trainer.default_root_dir={tmp_path}"], run=False)
    task, data, trainer = cli.model, cli.datamodule, cli.trainer
    start = time.perf_counter()
    trainer.fit(task, datamodule=data)
    fit_seconds = time.perf_counter() - start
    (result,) = trainer.test(task, datamodule=data, verbose=False)

    summary = trainable_summary(task)
    print(f"MiniLM LoRA: test_acc={result['test_acc']:.4f} trainable={summary.trainable} fit={fit_seconds:.0f}s")
    assert trainer.global_step == MAX_STEPS
    assert len(data.splits["train"]) == 8568 and len(data.splits["test"]) == 2000
    assert summary.trainable == 6 * 3 * 8 * (384 + 384) + 384 * 2 + 2  # q,k,v in 6 blocks + the head
    assert result["test_acc"] >= 0.80
