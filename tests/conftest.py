"""Tiny models and a plain LightningModule shared by the tests."""

import errno
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L
import pytest
import torch
from torch import nn

VOCAB = 128


def tiny_llama(vocab: int = VOCAB, hidden: int = 32, layers: int = 2, **settings: Any):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **settings)
    return LlamaForCausalLM(config)


def tiny_bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config)


def tiny_bert_folder(folder: Path, words: list[str], seed: int | None = 0, **config: Any) -> Path:
    """A tiny BERT classifier folder with a word-level tokenizer over ``words``, as a recipe's ``model:`` takes it."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    if seed is not None:
        torch.manual_seed(seed)
    settings = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=32)
    BertForSequenceClassification(BertConfig(**{**settings, **config})).save_pretrained(folder)
    return folder


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config)


class ConvMLP(nn.Module):
    """A plain torch model: a Conv2d stem and an MLP head on 8x8 single-channel images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


class TokenModule(L.LightningModule):
    """An ordinary LightningModule around a transformers model fed random token batches."""

    def __init__(self, model: nn.Module | None = None, build=None, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = model
        self.build = build
        self.lr = lr

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids)
        return out.logits

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        logits = self(input_ids)
        if logits.dim() == 3:  # causal LM: predict the next token
            return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        return nn.functional.cross_entropy(logits, input_ids[:, 0] % logits.shape[-1])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class ImageModule(TokenModule):
    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def token_loader(n: int = 16, seq: int = 12, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randint(0, VOCAB, (n, seq), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch)


def image_loader(n: int = 16, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch)


def make_trainer(callbacks, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


def trainable_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train, by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class TrainingStart(L.Callback):
    """Records the trainable tensors a fit starts from (after any checkpoint is restored) and the batches it runs."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.batches = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.tensors = trainable_tensors(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


def check_resume_reproduces_the_uninterrupted_run(build, callbacks, folder) -> dict[str, torch.Tensor]:
    """Two epochs straight vs one epoch, a checkpoint, and a resume on a freshly built module.

    ``build()`` returns a new TokenModule (same seed each time), ``callbacks()`` new callbacks.
    Asserts the checkpoint holds exactly the trainable tensors, the resumed fit starts from the
    saved tensors and runs only the second epoch's batches, every trainable tensor moves in it,
    and it ends bit for bit where the uninterrupted run ends. Returns the checkpoint's state dict.
    """
    uninterrupted = build()
    make_trainer(callbacks(), max_epochs=2, max_steps=-1).fit(uninterrupted, token_loader())

    first = build()
    trainer = make_trainer(callbacks(), max_epochs=1, max_steps=-1)
    trainer.fit(first, token_loader())
    trainer.save_checkpoint(folder / "epoch1.ckpt")
    saved = torch.load(folder / "epoch1.ckpt", weights_only=True)["state_dict"]
    assert saved.keys() == trainable_tensors(first).keys()  # adapter-only

    resumed, start = build(), TrainingStart()  # the base rebuilt from its source
    trainer = make_trainer([*callbacks(), start], max_epochs=2, max_steps=-1)
    trainer.fit(resumed, token_loader(), ckpt_path=folder / "epoch1.ckpt")
    assert start.tensors.keys() == saved.keys()
    for name in saved:
        assert torch.equal(start.tensors[name], saved[name]), f"{name}: the resumed fit did not start from the saved"
    assert start.batches == len(token_loader()), "the resumed fit ran more than the remaining epoch"
    expected, got = trainable_tensors(uninterrupted), trainable_tensors(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
        assert not torch.equal(got[name], saved[name]), f"{name} did not train in the second epoch"
    return saved


def fail_half_way_with_enospc(real_write):
    """A file writer that writes, cuts the file short and raises "No space left on device", as a full disk does."""
    def write(obj, path, *args, **kwargs):
        real_write(obj, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return write


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny matmuls run faster on one thread, and far faster when other processes load the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
