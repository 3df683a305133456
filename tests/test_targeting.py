"""Targeting on the models users bring: shared layers, parameters of the root, nested choices, plain containers."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from lightning_peft import IA3, LoRA, QuantizeBase, load_adapter, merge, save_adapter, unmerge

from conftest import tiny_llama


def shared_linear_model() -> nn.Sequential:
    """One nn.Linear used at two places (weight sharing by reuse, as a repeated block does)."""
    torch.manual_seed(0)
    linear = nn.Linear(8, 8)
    return nn.Sequential(linear, nn.Tanh(), linear)


@torch.no_grad()
def randomize_trainable(module: nn.Module) -> None:
    for param in module.parameters():
        if param.requires_grad:
            param.add_(torch.randn_like(param) * 0.3)


@pytest.mark.parametrize("method", [lambda: LoRA(r=2, target_modules=["2"]), lambda: LoRA(r=2),
                                    lambda: IA3(target_modules=["0"], feedforward_modules=[]),
                                    lambda: IA3(target_modules=["0", "2"], feedforward_modules=["2"])])
def test_a_layer_shared_by_two_places_is_one_adapted_layer_at_both_and_merges_exactly(method, tmp_path):
    model = shared_linear_model()
    method().inject(model)  # was: the second place kept the bare layer ('2' matched no module)
    assert model[0] is model[2] and type(model[0]).__name__ != "Linear"
    randomize_trainable(model)
    x = torch.randn(4, 8)
    adapted = model(x)
    layer = model[0]
    torch.testing.assert_close(adapted, layer(torch.tanh(layer(x))))
    merge(model)
    assert model[0] is model[2] and type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)  # was: 20.4 apart
    unmerge(model)
    assert model[0] is model[2] is layer
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="own layout, which peft does not read: its layer at 0 and 2 is one module "
                                         "at several places"):  # was: peft's layout, which peft adapts once
        save_adapter(model, tmp_path / "a")
    fresh = shared_linear_model()
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(x), adapted, atol=1e-6, rtol=0)


def test_a_peft_file_for_a_layer_at_several_places_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(shared_linear_model(), LoraConfig(r=2, target_modules=["0"])).save_pretrained(tmp_path)
    model = shared_linear_model()  # peft adapted place 0 alone; here the layer would act at 0 and 2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="is in peft's layout, which cannot hold LoRA.default. on this model: its "
                                         "layer at 0 and 2 is one module at several places"):
        load_adapter(model, tmp_path)
    assert type(model[0]) is nn.Linear and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_target_parameter_of_the_root_module_is_refused_and_the_model_left_as_it_was():
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.proj = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return self.fc(x) @ self.proj.T

    model = Root()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="cannot replace the model root itself"):
        LoRA(r=2, target_modules=None, target_parameters=["proj"]).inject(model)  # was: an inert wrapper at ''
    assert [name for name, _ in model.named_children()] == ["fc"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_compiled_plain_model_saves_the_names_of_the_uncompiled_one_and_loads_either_way(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = TwoLayers()
    compiled = torch.compile(copy.deepcopy(base), backend="eager")
    LoRA(r=2, target_modules=["fc1"]).inject(compiled)
    randomize_trainable(compiled)
    x = torch.randn(3, 8)
    save_adapter(compiled, tmp_path)
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == [
        "base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight"]  # was: ..._orig_mod.fc1...
    torch.testing.assert_close(load_adapter(copy.deepcopy(base), tmp_path)(x), compiled(x), atol=1e-6, rtol=0)
    again = torch.compile(copy.deepcopy(base), backend="eager")
    torch.testing.assert_close(load_adapter(again, tmp_path)(x), compiled(x), atol=1e-6, rtol=0)


def test_a_module_named_base_layers_keeps_its_name_in_parameter_targets():
    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base_layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

        def forward(self, x):
            return self.base_layers[1](self.base_layers[0](x))

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Stack()

        def forward(self, x):
            return self.model(x)

    model = LoRA(r=2, target_modules=None, target_parameters=["weight"]).inject(Outer())  # was: 'models.0', an error
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        f"model.base_layers.{i}.adapters.default.{t}" for i in (0, 1) for t in ("lora_A", "lora_B")]


def test_pissa_with_a_rank_above_a_layers_smallest_dimension_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"'1' has only 4 \(its smallest dimension\): use r <= 4"):
        LoRA(r=8, target_modules=["0", "1"], init="pissa").inject(model)  # was: a broadcast error from the SVD
    assert all(type(m) is nn.Linear for m in model)


def test_one_block_index_alone_is_taken_as_peft_takes_it():
    from lightning_peft import Selective

    for method in (LoRA(r=2, target_modules=["0"], layers=1), IA3(target_modules=["0"], feedforward_modules=[],
                                                                  layers=1), Selective(layers=1)):
        model = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])
        method.inject(model)  # was: TypeError: 'int' object is not iterable
        assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"1"}


def test_an_exclusion_that_excludes_nothing_is_warned_about():
    model = nn.ModuleDict({"teacher": nn.Sequential(nn.Linear(4, 4)), "student": nn.Sequential(nn.Linear(4, 4))})
    with pytest.warns(UserWarning, match=r"exclude_modules 'teacher' names 'teacher', which holds chosen layers but "
                                         r"is not one: they stay chosen; .* e\.g\. r'teacher\\\.\.\*'"):
        LoRA(r=2, exclude_modules=["teacher"]).inject(model)  # the container's name: its layers are still chosen
    with pytest.warns(UserWarning, match="exclude_modules 'techer' matches no module of this model"):
        LoRA(r=2, exclude_modules=["techer"]).inject(nn.ModuleDict({"teacher": nn.Sequential(nn.Linear(4, 4))}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what the method would leave out anyway (the head under all-linear): no alarm
        LoRA(r=2, exclude_modules=["lm_head"]).inject(tiny_llama())
        IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
            exclude_modules=["layers.0.self_attn.k_proj"]).inject(tiny_llama())
        QuantizeBase("nf4", skip_modules=["lm_head"]).inject(tiny_llama(hidden=64))


def test_only_lora_is_pointed_at_a_multihead_attention_module():
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2)})
    for method in (IA3(target_modules=["out_proj"], feedforward_modules=[]), LoRA(r=2, target_modules=["out_proj"])):
        with pytest.raises(TypeError, match="only LoRA adapts nn.MultiheadAttention, targeted as the attention module"):
            method.inject(model)


def test_errors_on_a_plain_sequential_name_its_numbered_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Module names that exist: 0 \(Linear\), 2 \(Linear\)$"):  # was: (none)
        LoRA(r=2, target_modules=["proj"]).inject(model)
    with pytest.raises(TypeError, match="'1' of type ReLU.* It holds no layer with weights: leave it out"):
        LoRA(r=2, target_modules=["1"]).inject(model)


def test_all_linear_leaves_out_a_linear_subclass_with_its_own_forward():
    class Router(nn.Linear):  # as Llama4's: an nn.Linear whose forward returns a tuple
        def forward(self, x):
            logits = super().forward(x)
            return logits.softmax(-1), logits

    class PlainLinear(nn.Linear):  # as Falcon's FalconLinear: a forward of its own that computes a linear layer
        def __init__(self, *args):
            super().__init__(*args)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return x @ self.weight.T + self.bias

    class Scores(nn.Linear):  # the right shape, but not a linear layer's output
        def forward(self, x):
            return super().forward(x).softmax(-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.router, self.scores = PlainLinear(8, 8), Router(8, 4), Scores(8, 8)

        def forward(self, x):
            weights, _ = self.router(x)
            return self.proj(x) * weights.sum(-1, keepdim=True) + self.scores(x)

    x = torch.randn(2, 8)
    for method in (LoRA(r=2), QuantizeBase("int8")):
        model = Block()
        model.proj.register_forward_hook(lambda *args: pytest.fail("the probe ran the model's own layer"))
        calls = model.proj.calls  # its buffer: a probe of the layer itself would count a call
        with pytest.warns(UserWarning, match="leaves out router and 1 more, of class Router, Scores: an nn.Linear "
                                             "subclass whose forward computes other than a linear layer"):
            method.inject(model)
        assert type(model.router) is Router and type(model.scores) is Scores  # left out
        assert type(model.proj) is not PlainLinear and calls == 0  # taken; untouched
        model.proj._forward_hooks.clear()  # the hook moved with the layer, onto what took its place
        model(x)  # was: LoRA's layer added its update to a tuple; QuantizeBase dropped the softmax


def test_a_block_held_twice_keeps_peft_s_layout_both_ways(tmp_path):
    from peft import LoraConfig, get_peft_model

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.tanh(self.fc(x))

    class Twice(nn.Module):  # one block at two places: its layer is at one place, inside it, for peft too
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            block = Block()
            self.layers = nn.ModuleList([block, block])

        def forward(self, x):
            for block in self.layers:
                x = block(x)
            return x

    theirs = get_peft_model(Twice(), LoraConfig(r=2, target_modules=["fc"]))
    randomize_trainable(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    x = torch.randn(3, 8)
    ours = load_adapter(Twice(), tmp_path / "peft")  # was: refused as a layer at several places
    torch.testing.assert_close(ours(x), theirs(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(ours, tmp_path / "ours")  # in peft's layout: no warning
    assert "peft_type" in json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
