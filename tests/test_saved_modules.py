"""modules_to_save: each adapter trains its own copy of a module (a head), so tasks on one base keep their heads."""

import copy
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from lightning_peft import (
    IA3,
    LoRA,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge,
    per_row_adapters,
    save_adapter,
    set_adapter,
    unmerge,
)

from conftest import VOCAB, tiny_bert

INPUTS = {"input_ids": torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(2))}


def two_tasks(base):
    model = copy.deepcopy(base)
    for name in ("a", "b"):
        LoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], adapter_name=name).inject(model)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    return model.eval()


def logits(model, **inputs):
    with torch.no_grad():
        return model(**(inputs or INPUTS)).logits


def test_each_adapter_has_its_own_head_and_the_original_stays_frozen():
    base = tiny_bert().eval()
    model = two_tasks(base)
    heads = model.classifier.adapters
    assert not torch.equal(heads["a"].weight, heads["b"].weight)
    assert not model.classifier.base_layer.weight.requires_grad and heads["a"].weight.requires_grad
    torch.testing.assert_close(model.classifier.base_layer.weight, base.classifier.weight, rtol=0, atol=0)
    set_adapter(model, "a")
    with_a = logits(model)
    set_adapter(model, "b")
    assert not torch.allclose(with_a, logits(model))
    with disable_adapters(model):
        torch.testing.assert_close(logits(model), logits(base))  # the original head, untrained


def test_per_row_routes_each_row_to_its_adapters_head_and_gradients_stay_per_task():
    model = two_tasks(tiny_bert())
    names = ["a", "b", None, "a"]
    with torch.no_grad(), per_row_adapters(model, names):
        mixed = model(**INPUTS).logits
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in INPUTS.items()}
        if name is None:
            with disable_adapters(model):
                expected = logits(model, **row)
        else:
            set_adapter(model, name)
            expected = logits(model, **row)
        torch.testing.assert_close(mixed[i:i + 1], expected, atol=1e-5, rtol=1e-5)
    model.train()
    with per_row_adapters(model, names):
        model(**INPUTS).logits[[0, 3]].sum().backward()  # the rows of "a"
    assert model.classifier.adapters["a"].weight.grad.abs().sum() > 0
    grad_b = model.classifier.adapters["b"].weight.grad
    assert grad_b is None or not grad_b.any()


def test_a_saved_head_loads_back_under_its_own_name_and_alone(tmp_path):
    base = tiny_bert().eval()
    model = two_tasks(base)
    save_adapter(model, tmp_path / "b", adapter_name="b")
    set_adapter(model, "b")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "b", adapter_name="other").eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-6, rtol=1e-6)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b").eval()
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-5, rtol=1e-5)


def test_delete_and_merge_handle_the_copies():
    model = two_tasks(tiny_bert())
    set_adapter(model, "a")
    with_a = logits(model)
    merge(model)
    assert model.classifier.__class__ is nn.Linear
    torch.testing.assert_close(logits(model), with_a, atol=1e-5, rtol=1e-5)
    unmerge(model)
    delete_adapter(model, "a")
    assert list(model.classifier.adapters) == ["b"]
    delete_adapter(model, "b")
    assert model.classifier.__class__ is nn.Linear and not any(p.requires_grad for p in model.parameters())


def test_deleting_one_method_s_adapter_keeps_the_head_another_method_of_that_name_trains():
    model = tiny_bert()
    LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"], adapter_name="x").inject(model)
    IA3(target_modules=["key"], feedforward_modules=[], adapter_name="x").inject(model)
    head = model.classifier.adapters["x"]
    delete_adapter(model, "x", method="IA3")
    assert model.classifier.adapters["x"] is head and all(p.requires_grad for p in head.parameters())
    delete_adapter(model, "x", method="LoRA")
    assert model.classifier.__class__ is nn.Linear


def test_two_methods_of_one_adapter_name_cannot_both_copy_a_module():
    model = tiny_bert()
    LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"]).inject(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="'classifier' is in modules_to_save of LoRA\\[default\\] already"):
        IA3(target_modules=["key"], feedforward_modules=[], modules_to_save=["classifier"]).inject(model)
    assert model.state_dict().keys() == before.keys()


class NormedHead(nn.Module):
    """A linear layer, then a BatchNorm whose running statistics change as it trains: a head with buffers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def trained_normed_head():
    model = LoRA(r=2, target_modules=["net.0"], modules_to_save=["net.1"]).inject(NormedHead()).train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(32, 8) * 3 + 5)  # the copy's running statistics move from 0 and 1
    return model.eval()


def test_a_saved_modules_buffers_travel_with_its_adapter_file(tmp_path):
    model = trained_normed_head()
    loaded = load_adapter(NormedHead(), save_adapter(model, tmp_path)).eval()
    x = torch.randn(4, 8) * 3 + 5
    torch.testing.assert_close(loaded(x), model(x))  # eval mode reads the running statistics
    copy_ = loaded.net[1].adapters["default"]
    assert torch.equal(copy_.running_mean, model.net[1].adapters["default"].running_mean)
    assert not copy_.running_mean.eq(0).all()


class Fitted(L.LightningModule):
    """A LightningModule around `NormedHead`."""

    def __init__(self):
        super().__init__()
        self.model = NormedHead()

    def training_step(self, batch, batch_idx):
        return self.model(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_an_adapter_only_checkpoint_keeps_a_saved_modules_buffers(tmp_path):
    from conftest import make_trainer

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8) * 3 + 5), batch_size=16)
    methods = lambda: [LoRA(r=2, target_modules=["net.0"], modules_to_save=["net.1"])]  # noqa: E731
    trained = Fitted()
    trainer = make_trainer(methods(), max_steps=4)
    trainer.fit(trained, data)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    saved = torch.load(tmp_path / "run.ckpt", weights_only=True)["state_dict"]
    assert {"model.net.1.adapters.default.running_mean", "model.net.1.adapters.default.running_var"} <= set(saved)
    resumed = Fitted()
    make_trainer(methods(), max_steps=4).fit(resumed, data, ckpt_path=tmp_path / "run.ckpt")  # nothing left to train
    expected = trained.model.net[1].adapters["default"]
    got = resumed.model.net[1].adapters["default"]
    assert torch.equal(got.running_mean, expected.running_mean) and torch.equal(got.running_var, expected.running_var)


def test_the_gathered_adapter_state_holds_a_saved_modules_buffers():
    from lightning_peft import full_adapter_state_dict

    model = trained_normed_head()
    state = full_adapter_state_dict(model)
    assert torch.equal(state["net.1.adapters.default.running_mean"], model.net[1].adapters["default"].running_mean)
    assert "net.1.adapters.default.weight" in state


def test_an_adapter_only_checkpoint_keeps_a_frozen_norms_running_statistics(tmp_path):
    from conftest import make_trainer

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8) * 3 + 5), batch_size=16)
    methods = lambda: [LoRA(r=2, target_modules=["net.0", "net.3"])]  # noqa: E731  (the BatchNorm stays frozen)
    trained = Fitted()
    trainer = make_trainer(methods(), max_steps=4)
    trainer.fit(trained, data)  # in train mode the frozen BatchNorm's statistics move
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    resumed = Fitted()
    make_trainer(methods(), max_steps=4).fit(resumed, data, ckpt_path=tmp_path / "run.ckpt")  # nothing left to train
    assert not torch.equal(resumed.model.net[1].running_mean, Fitted().model.net[1].running_mean)
    assert torch.equal(resumed.model.net[1].running_mean, trained.model.net[1].running_mean)
    assert torch.equal(resumed.model.net[1].running_var, trained.model.net[1].running_var)


def test_a_checkpoint_without_running_statistics_still_loads(tmp_path):
    from conftest import make_trainer

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8) * 3 + 5), batch_size=16)
    methods = lambda: [LoRA(r=2, target_modules=["net.0", "net.3"])]  # noqa: E731
    trainer = make_trainer(methods(), max_steps=4)
    trainer.fit(Fitted(), data)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    older = torch.load(tmp_path / "run.ckpt", weights_only=True)  # as checkpoints were written before
    statistics = (".running_mean", ".running_var", ".num_batches_tracked")
    older["state_dict"] = {k: v for k, v in older["state_dict"].items() if not k.endswith(statistics)}
    del older["lightning_peft"]["sha256"]
    torch.save(older, tmp_path / "older.ckpt")
    make_trainer(methods(), max_steps=4).fit(Fitted(), data, ckpt_path=tmp_path / "older.ckpt")  # loads


@pytest.mark.parametrize("names", [["block", "fc"], ["fc", "block"], ["block", "block.fc"]])
def test_a_saved_module_and_one_inside_it_make_one_copy_that_saves_and_loads_exactly(names, tmp_path):
    from lightning_peft import LoRA, load_adapter, save_adapter

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(self.fc(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.block = nn.Linear(8, 8), Block()

        def forward(self, x):
            return self.block(self.inp(x))

    torch.manual_seed(0)
    base = Net()
    model = LoRA(r=2, target_modules=["inp"], modules_to_save=names).inject(copy.deepcopy(base))
    assert [n for n, _ in model.named_modules() if "adapters" not in n and n.startswith("block")] == [
        "block", "block.base_layer", "block.base_layer.fc", "block.base_layer.norm"]  # was: a stray block.fc copy
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    x = torch.randn(2, 8)
    save_adapter(model, tmp_path)
    torch.testing.assert_close(load_adapter(copy.deepcopy(base), tmp_path)(x), model(x), atol=0, rtol=0)


def test_a_target_inside_a_saved_module_is_left_to_its_copy_as_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=40, num_labels=3)
    base = RobertaForSequenceClassification(config).eval()  # its head holds a layer named "dense" too
    model = copy.deepcopy(base)
    for name in ("a", "b"):
        LoRA(r=2, target_modules=["dense"], modules_to_save=["classifier"], adapter_name=name).inject(model)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.2)
    assert not [n for n, _ in model.classifier.named_parameters() if "lora_A" in n]  # was: LoRA in every copy
    set_adapter(model, "a")
    save_adapter(model, tmp_path / "a", adapter_name="a")
    expected = logits(model, **INPUTS)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()  # was: loaded 2.09 away
    torch.testing.assert_close(logits(theirs, **INPUTS), expected, rtol=0, atol=1e-5)
    ours = load_adapter(copy.deepcopy(base), tmp_path / "a").eval()  # was: refused, a key with no place
    torch.testing.assert_close(logits(ours, **INPUTS), expected, rtol=0, atol=1e-5)


def test_a_target_that_is_a_saved_module_is_left_out_and_alone_is_refused():
    model = tiny_bert()
    LoRA(r=2, target_modules=["query", "classifier"], modules_to_save=["classifier"]).inject(model)
    assert [n for n, _ in model.classifier.named_parameters()] == [  # was: LoRA on the frozen original too
        "adapters.default.weight", "adapters.default.bias", "base_layer.weight", "base_layer.bias"]
    with pytest.raises(ValueError, match="matched only classifier, which modules_to_save trains whole"):
        LoRA(r=2, target_modules=["classifier"], modules_to_save=["classifier"]).inject(tiny_bert())


def test_target_parameters_inside_a_saved_module_are_left_to_its_copy():
    with pytest.raises(ValueError, match="matched only classifier.weight, inside a module that modules_to_save"):
        LoRA(r=2, target_modules=None, target_parameters=["classifier.weight"],  # was: LoRA on the frozen original
             modules_to_save=["classifier"]).inject(tiny_bert())


def test_two_active_adapters_with_copies_of_one_module_are_warned_of_once():
    from lightning_peft import BitFit

    model = LoRA(r=2, target_modules=["query"], modules_to_save=["classifier"], adapter_name="lora").inject(tiny_bert())
    BitFit(modules_to_save=["classifier"], adapter_name="bitfit").inject(model)
    ids = torch.randint(0, 32, (2, 5))
    with pytest.warns(UserWarning, match="the active adapters lora, bitfit each have a copy of this Linear .* only "
                                         "the last, 'bitfit', computes"):  # was: lora's copy silently never trained
        model(input_ids=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids)  # once
