"""One real run: MiniLM-L6 + LoRA r=8 on the movie review snippets, the protocol of ANCHORS.md.

Minutes, not seconds: the only test that trains a real pretrained model on real data.
"""

import time

import lightning as L
import pytest
import torch

from lightning_peft import LoRA, trainable_summary
from lightning_peft.data import TextClassificationData
from lightning_peft.tasks import SequenceClassification

MAX_STEPS = 300


@pytest.fixture
def two_threads():
    """conftest pins one thread for the tiny models; this run is real work for both cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_minilm_lora_reaches_080_on_movie_snippets(two_threads):
    L.seed_everything(0)
    task = SequenceClassification("minilm-l6", num_labels=2, learning_rate=1e-3, warmup_steps=30)
    data = TextClassificationData(source="movie-snippets", max_length=64, batch_size=32, val_fraction=0)
    lora = LoRA(r=8, alpha=16, dropout=0.1, target_modules=["query", "key", "value"], modules_to_save=["classifier"])
    trainer = L.Trainer(accelerator="cpu", max_steps=MAX_STEPS, callbacks=[lora], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(task, data)
    fit_seconds = time.perf_counter() - start
    (result,) = trainer.test(task, data, verbose=False)

    summary = trainable_summary(task)
    print(f"MiniLM LoRA: test_acc={result['test_acc']:.4f} trainable={summary.trainable} fit={fit_seconds:.0f}s")
    assert trainer.global_step == MAX_STEPS
    assert len(data.splits["train"]) == 8568 and len(data.splits["test"]) == 2000
    assert summary.trainable == 6 * 3 * 8 * (384 + 384) + 384 * 2 + 2  # q,k,v in 6 blocks + the head
    assert result["test_acc"] >= 0.80
