"""Adapter-only Lightning checkpoints: size, exact resume, mismatches, crash safety."""

import os
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft.lightning.checkpointing as checkpointing
from lightning_peft import LoRA, merge, trainable_summary, unmerge

from conftest import (
    TokenModule,
    check_resume_reproduces_the_uninterrupted_run,
    make_trainer,
    tiny_llama,
    token_loader,
    trainable_tensors,
)

MB = 1024 * 1024


def big_vocab_llama():
    """Tiny blocks but a 4096-token vocabulary: the base (about 2 MB) dwarfs the adapter."""
    torch.manual_seed(0)
    return tiny_llama(vocab=4096, hidden=64)


def lora():
    return LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])



def test_checkpoint_size_follows_the_adapter(tmp_path):
    module = TokenModule(big_vocab_llama())
    trainer = make_trainer([lora()], max_steps=3, default_root_dir=tmp_path)
    trainer.fit(module, token_loader())
    path = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(path)

    adapter_bytes = trainable_summary(module).adapter_bytes
    base_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    assert base_bytes > 2 * adapter_bytes + MB  # the bound below could not hold with the base inside
    assert os.path.getsize(path) <= 2 * adapter_bytes + MB
    saved = torch.load(path, weights_only=True)
    assert set(saved["state_dict"]) == set(trainable_tensors(module))
    assert saved["optimizer_states"]  # a full training checkpoint, just without the frozen base


def test_full_checkpoints_on_request(tmp_path):
    module = TokenModule(big_vocab_llama())
    trainer = make_trainer([LoRA(r=4, target_modules=["q_proj"], checkpoint="full")], max_steps=1)
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    assert set(torch.load(tmp_path / "full.ckpt", weights_only=True)["state_dict"]) == set(module.state_dict())


def test_weights_only_checkpoints_are_adapter_only(tmp_path):
    module = TokenModule(big_vocab_llama())
    saver = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, every_n_train_steps=2)
    make_trainer([lora(), saver], max_steps=2, enable_checkpointing=True).fit(module, token_loader())
    (path,) = tmp_path.glob("*.ckpt")
    saved = torch.load(path, weights_only=True)
    assert set(saved["state_dict"]) == set(trainable_tensors(module))
    assert "optimizer_states" not in saved


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    check_resume_reproduces_the_uninterrupted_run(lambda: TokenModule(big_vocab_llama()), lambda: [lora()], tmp_path)


def test_a_resumed_run_draws_the_dropout_masks_of_the_uninterrupted_one(tmp_path):
    """The random states go with the checkpoint: with dropout, the resumed run still ends bit for bit."""
    check_resume_reproduces_the_uninterrupted_run(
        lambda: TokenModule(big_vocab_llama()), lambda: [LoRA(r=4, alpha=8, dropout=0.1, target_modules=["q_proj"])],
        tmp_path)


def two_adapters(first="a"):
    """LoRA "a" and "b" (of other ranks), ``first`` injected first: the optimizer lists its tensors first."""
    made = {"a": LoRA(r=2, target_modules=["q_proj"], adapter_name="a"),
            "b": LoRA(r=3, alpha=4, target_modules=["q_proj"], adapter_name="b")}
    return [made[first], *(cb for name, cb in made.items() if name != first)]


def build_token_module():
    torch.manual_seed(0)
    return TokenModule(tiny_llama())


def test_a_resume_with_the_methods_in_another_order_gives_each_tensor_its_own_optimizer_state(tmp_path):
    uninterrupted = build_token_module()
    make_trainer(two_adapters("a"), max_epochs=2, max_steps=-1).fit(uninterrupted, token_loader())
    trainer = make_trainer(two_adapters("a"), max_epochs=1, max_steps=-1)
    trainer.fit(build_token_module(), token_loader())
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = build_token_module()  # was: a shape error (or, of one rank, each adapter with the other's moments)
    make_trainer(two_adapters("b"), max_epochs=2, max_steps=-1).fit(resumed, token_loader(),
                                                                     ckpt_path=tmp_path / "epoch1.ckpt")
    expected, got = trainable_tensors(uninterrupted), trainable_tensors(resumed)
    for name in expected:  # only the order of two adapters' sums in each layer differs
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


class TwoGroups(TokenModule):
    """Each adapter's tensors in a parameter group of its own."""

    def configure_optimizers(self):
        groups = [[p for n, p in self.named_parameters() if p.requires_grad and f".{name}." in n] for name in "ab"]
        return torch.optim.AdamW([{"params": group} for group in groups], lr=self.lr)


def test_a_resume_whose_optimizer_groups_the_tensors_otherwise_is_refused(tmp_path):
    trainer = make_trainer(two_adapters("a"), max_steps=2)
    trainer.fit(build_token_module(), token_loader())
    trainer.save_checkpoint(tmp_path / "one_group.ckpt")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="holds the optimizer state of the same parameters in other groups"):
        make_trainer(two_adapters("a"), max_steps=4).fit(TwoGroups(tiny_llama()), token_loader(),
                                                         ckpt_path=tmp_path / "one_group.ckpt")


def test_a_checkpoint_of_a_merged_model_is_refused_before_anything_is_written(tmp_path):
    module = TokenModule(tiny_llama())
    trainer = make_trainer([lora()], max_steps=2)
    trainer.fit(module, token_loader())
    merge(module)
    with pytest.raises(ValueError, match="this model has merged adapters.*unmerge it first"):
        trainer.save_checkpoint(tmp_path / "merged.ckpt")  # was: an adapter-only checkpoint without tensors
    assert not list(tmp_path.iterdir())
    unmerge(module)
    trainer.save_checkpoint(tmp_path / "unmerged.ckpt")
    assert torch.load(tmp_path / "unmerged.ckpt", weights_only=True)["state_dict"].keys() == \
        trainable_tensors(module).keys()


class PathModule(TokenModule):
    """A module whose hyperparameters hold a pathlib.Path, which weights_only loading refuses."""

    def __init__(self, model, folder):
        super().__init__(model)
        self.save_hyperparameters({"folder": folder})


def test_a_checkpoint_weights_only_refuses_names_the_type_and_how_to_load_it_if_trusted(tmp_path):
    trainer = make_trainer([lora()], max_steps=1)
    trainer.fit(PathModule(tiny_llama(), tmp_path), token_loader())
    trainer.save_checkpoint(tmp_path / "path.ckpt")
    with pytest.raises(ValueError, match=r"holds a pathlib\.\w*Path object.*weights_only=False: trainer.fit"):
        make_trainer([lora()], max_steps=2).fit(PathModule(tiny_llama(), tmp_path), token_loader(),
                                                ckpt_path=tmp_path / "path.ckpt")  # was: "not written by Lightning"
    make_trainer([lora()], max_steps=2).fit(PathModule(tiny_llama(), tmp_path), token_loader(),
                                            ckpt_path=tmp_path / "path.ckpt", weights_only=False)


def test_mismatched_checkpoint_names_the_tensor_and_both_shapes(tmp_path):
    module = TokenModule(big_vocab_llama())
    trainer = make_trainer([lora()], max_steps=1)
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "r4.ckpt")

    torch.manual_seed(0)
    other = TokenModule(tiny_llama(vocab=4096, hidden=48))  # same settings, another model: other shapes
    with pytest.raises(ValueError) as info:
        make_trainer([lora()], max_steps=2).fit(other, token_loader(), ckpt_path=tmp_path / "r4.ckpt")
    message = str(info.value)
    assert "model.model.layers.0.self_attn.q_proj.adapters.default.lora_A" in message
    assert "(4, 64)" in message and "(4, 48)" in message


def test_resuming_with_other_settings_is_refused_before_anything_is_loaded(tmp_path):
    module = TokenModule(big_vocab_llama())
    trainer = make_trainer([lora()], max_steps=1)
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "r4.ckpt")

    for changed, expected in ((dict(alpha=32), "alpha=8 (here 32)"), (dict(r=8), "r=4 (here 8)")):
        other = TokenModule(big_vocab_llama())
        before = {k: v.clone() for k, v in other.state_dict().items()}
        settings = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], **changed}
        with pytest.raises(ValueError, match=re.escape(expected)):
            make_trainer([LoRA(**settings)], max_steps=2).fit(other, token_loader(), ckpt_path=tmp_path / "r4.ckpt")
        after = other.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items() if k in after)


def test_a_weights_only_checkpoint_keeps_its_methods_settings_checked(tmp_path):
    module = TokenModule(big_vocab_llama())
    trainer = make_trainer([lora()], max_steps=1)
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    saved = torch.load(tmp_path / "weights.ckpt", weights_only=True)
    assert "callbacks" not in saved  # Lightning leaves the callbacks' states out of weights-only checkpoints
    with pytest.raises(ValueError, match=re.escape("alpha=8 (here 32)")):
        make_trainer([LoRA(r=4, alpha=32, target_modules=["q_proj", "v_proj"])], max_steps=2).fit(
            TokenModule(big_vocab_llama()), token_loader(), ckpt_path=tmp_path / "weights.ckpt")


def test_checkpoint_with_other_targets_is_refused(tmp_path):
    module = TokenModule(big_vocab_llama())
    trainer = make_trainer([lora()], max_steps=1)
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "qv.ckpt")
    with pytest.raises(ValueError, match="k_proj"):
        make_trainer([LoRA(r=4, target_modules=["q_proj", "v_proj", "k_proj"])], max_steps=2).fit(
            TokenModule(big_vocab_llama()), token_loader(), ckpt_path=tmp_path / "qv.ckpt")


def test_a_crash_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    module = TokenModule(big_vocab_llama())
    trainer = make_trainer([lora()], max_steps=1)
    trainer.fit(module, token_loader())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    def crash_half_way(obj, target):
        with open(target, "wb") as f:  # the path it was given: a writer straight into last.ckpt truncates it here
            f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


class StopAt(L.Callback):
    """Ends the fit after ``step`` optimizer steps, as a preempted job ends."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def recipe_fit(folder, budget: dict, *callbacks, ckpt_path=None, rows: int = 24, val_fraction: float = 0.0):
    """A LoRA recipe fit (tiny BERT, dropout on) from a fixed seed: the batches it trained on and its adapter."""
    from test_cli import WORDS, sentiment_rows, write_data

    from lightning_peft.data import TextClassificationData
    from lightning_peft.tasks import SequenceClassification

    from conftest import tiny_bert_folder

    model_dir = folder / "model"
    if not model_dir.is_dir():
        tiny_bert_folder(model_dir, WORDS)
    train = write_data(folder, "train", sentiment_rows(rows, 0))
    torch.manual_seed(0)
    task = SequenceClassification(str(model_dir), warmup_steps=1, learning_rate=1e-2)
    data = TextClassificationData(train_file=str(train), batch_size=8, val_fraction=val_fraction, max_length=16)
    seen = []
    task.on_train_batch_start = lambda batch, batch_idx: seen.append(batch["input_ids"].tolist())
    trainer = L.Trainer(accelerator="cpu", **budget, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(callbacks),
                        num_sanity_val_steps=1 if val_fraction else 0,
                        callbacks=[LoRA(r=4, dropout=0.1, target_modules=["query", "value"]), *callbacks])
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    return seen, trainable_tensors(task)


@pytest.mark.parametrize("budget", [dict(max_steps=6), dict(max_epochs=2),  # by epochs, the steps are counted
                                    dict(max_steps=6, limit_train_batches=2)])  # epochs of 2 of the 3 batches
@pytest.mark.parametrize("stop", [1, 3, 4])  # inside the first epoch of 3 batches, at its end, inside the second
def test_a_recipe_fit_resumed_from_any_step_sees_the_same_batches_and_ends_bit_for_bit(tmp_path, stop, budget):
    order, expected = recipe_fit(tmp_path, budget)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    recipe_fit(tmp_path, budget, saver, StopAt(stop))
    resumed_order, got = recipe_fit(tmp_path, budget, ckpt_path=tmp_path / "ckpt" / f"step={stop}.ckpt")
    assert resumed_order == order[stop:]  # the batches after the checkpoint's, in the uninterrupted order
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("budget", [dict(max_steps=6), dict(max_epochs=2)])  # by epochs, not restarted: sanity check
def test_a_fit_resumed_from_an_epoch_end_checkpoint_after_a_sanity_check_ends_bit_for_bit(tmp_path, budget):
    """Lightning starts such a fit as a new epoch and runs the sanity check, whose loaders draw random numbers."""
    from test_multi_task import StopAfterEpoch

    settings = dict(rows=32, val_fraction=0.25)
    order, expected = recipe_fit(tmp_path, budget, **settings)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="epoch", save_on_train_epoch_end=True)
    recipe_fit(tmp_path, budget, saver, StopAfterEpoch(), **settings)
    resumed_order, got = recipe_fit(tmp_path, budget, ckpt_path=tmp_path / "ckpt" / "epoch.ckpt", **settings)
    assert resumed_order == order[3:]  # after the first epoch's 3 batches
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


class Validated(TokenModule):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))


@pytest.mark.parametrize("settings, files", [
    (dict(save_last=True), {"epoch=0-step=5.ckpt": 5, "last.ckpt": 5}),  # was: last.ckpt of step 3
    (dict(every_n_epochs=0), {}),  # saving switched off: nothing
    (dict(filename="{epoch}-{step}-{val_loss:.2f}"), None),  # a metric in the name: as Lightning alone saves
])
def test_the_last_step_is_checkpointed_as_the_callback_would(tmp_path, settings, files):
    def fit(extra):
        saver = ModelCheckpoint(dirpath=tmp_path / str(len(extra)), **settings)
        make_trainer([lora(), saver, *extra], max_steps=5, val_check_interval=3, limit_val_batches=1,
                     enable_checkpointing=True).fit(Validated(tiny_llama()), token_loader(n=32), token_loader(n=8))
        folder = tmp_path / str(len(extra))
        return {p.name: torch.load(p, weights_only=True)["global_step"] for p in folder.glob("*.ckpt")}

    plain, ours = fit([]), fit([checkpointing.CheckpointTheLastStep()])
    if files is None:  # named by a validation's metric: the same steps as without it
        assert sorted(ours.values()) == sorted(plain.values())
    else:
        assert ours == files


def test_a_run_that_fails_before_it_starts_writes_no_mislabelled_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    class FailsToStart(TokenModule):
        def configure_optimizers(self):
            raise RuntimeError("no optimizer")

    module = FailsToStart(tiny_llama())
    trainer = make_trainer([LoRA(r=4), OnExceptionCheckpoint(dirpath=tmp_path, filename="failed")], max_steps=2,
                           enable_checkpointing=True)
    with pytest.warns(UserWarning, match="was not written: the model holds no adapter"), pytest.raises(RuntimeError):
        trainer.fit(module, token_loader())
    assert not (tmp_path / "failed.ckpt").exists()  # was: the whole base, flagged as an adapter-only checkpoint


def test_an_adapter_checkpoint_loads_back_into_blocks_under_activation_checkpointing(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    class Tested(TokenModule):
        def test_step(self, batch, batch_idx):
            self.log("test_loss", self.training_step(batch, batch_idx))

    torch.manual_seed(0)
    model = tiny_llama()
    for i, block in enumerate(model.model.layers):
        model.model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    module = Tested(model)
    trainer = make_trainer([LoRA(r=4)], max_steps=2)
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    tested = trainer.test(module, token_loader(), verbose=False)[0]["test_loss"]
    # was: "Missing key(s)" for every frozen tensor inside a wrapped block
    assert trainer.test(module, token_loader(), ckpt_path=tmp_path / "last.ckpt", verbose=False)[0]["test_loss"] == \
        tested
