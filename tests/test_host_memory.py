"""ReleaseFreedMemory: the heap is trimmed after each block of a training forward, and nowhere else."""

import pytest
import torch
from torch import nn

import lightning_peft.lightning.host_memory as host_memory
from lightning_peft import LoRA, ReleaseFreedMemory
from lightning_peft.lightning.host_memory import repeated_blocks

from conftest import TokenModule, make_trainer, tiny_llama, token_loader

BLOCKS = 3


class ValidatedTokenModule(TokenModule):
    """TokenModule with a validation forward, which must not trim (no graph is built)."""

    def validation_step(self, batch, batch_idx):
        self.model(input_ids=batch[0])


@pytest.fixture
def trims(monkeypatch):
    """Count the heap trims instead of making them."""
    calls = []
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: lambda: calls.append(1))
    return calls


def test_trims_after_each_block_of_each_training_forward(trims):
    module = ValidatedTokenModule(tiny_llama(layers=BLOCKS))
    trainer = make_trainer([LoRA(r=2, target_modules=["q_proj"]), ReleaseFreedMemory()], max_steps=2,
                           limit_val_batches=2, val_check_interval=1)
    trainer.fit(module, token_loader(), token_loader(n=8))

    assert len(trims) == 2 * BLOCKS  # two training steps; the validation forwards trimmed nothing
    assert not any(block._forward_hooks for block in module.model.model.layers)  # removed after fit


class FailingTokenModule(TokenModule):
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        raise RuntimeError("a failing step")


def test_a_failed_fit_leaves_no_hook_and_a_second_fit_removes_its_own(trims):
    module = FailingTokenModule(tiny_llama(layers=BLOCKS))
    callback = ReleaseFreedMemory()
    with pytest.raises(RuntimeError, match="a failing step"):
        make_trainer([LoRA(r=2, target_modules=["q_proj"]), callback], max_steps=2).fit(module, token_loader())
    assert not any(block._forward_hooks for block in module.model.model.layers)  # was: 1 each, for good
    callback.on_fit_start(None, module)  # a second fit's start, its hooks not yet removed
    callback.on_fit_start(None, module)
    assert all(len(block._forward_hooks) == 1 for block in module.model.model.layers)


def test_trainer_fit_unchanged_by_trimming():
    """The real trim: the same adapter weights as a fit without it."""
    weights = []
    for callbacks in ([], [ReleaseFreedMemory()]):
        torch.manual_seed(0)
        module = TokenModule(tiny_llama(layers=BLOCKS))
        make_trainer([LoRA(r=2, target_modules=["q_proj"]), *callbacks], max_steps=2).fit(module, token_loader())
        weights.append({n: p.detach() for n, p in module.named_parameters() if p.requires_grad})
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_without_malloc_trim_it_warns_and_trains(monkeypatch):
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: None)
    module = TokenModule(tiny_llama(layers=BLOCKS))
    with pytest.warns(UserWarning, match="ReleaseFreedMemory does nothing with a C library without malloc_trim"):
        make_trainer([LoRA(r=2, target_modules=["q_proj"]), ReleaseFreedMemory()], max_steps=1).fit(
            module, token_loader())
    assert not any(block._forward_hooks for block in module.model.model.layers)


def test_glibc_trim_is_found_and_runs():
    trim = host_memory._malloc_trim()
    if trim is None:
        pytest.skip("this C library has no malloc_trim (not glibc)")
    trim()


class Expert(nn.Linear):
    pass


class MoEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(Expert(4, 4) for _ in range(3))


class EncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(MoEBlock() for _ in range(2))
        self.decoder = nn.ModuleList(MoEBlock() for _ in range(3))
        self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])  # not one class: not blocks


def test_repeated_blocks_are_the_outermost_lists_of_one_class():
    model = EncoderDecoder()
    blocks = repeated_blocks(model)
    assert blocks == [*model.encoder, *model.decoder]  # the experts inside them are not blocks
