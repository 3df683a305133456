"""combine_adapters: LoRA adapters combined into a new one, against closed forms written out here."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_peft import LoRA, QuantizeBase, combine_adapters, save_adapter, set_adapter
from lightning_peft.core.injection import peft_layers
from lightning_peft.core.layer import PEFTModule
from lightning_peft.lora.layers import LoRALayer

from conftest import VOCAB, tiny_bert, tiny_llama

IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


def with_adapters(model, *methods):
    for method in methods:
        method.inject(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * (0.3 if "lora" in name else 0.5))
    return model.eval()


def logits(model, *active):
    for part in model.modules():
        if isinstance(part, PEFTModule):
            part.set_active(list(active))
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora_layers(model):
    return [layer for _, layer in peft_layers(model) if isinstance(layer, LoRALayer)]


def scaled_update(adapter, weight):
    return weight * adapter.scale * adapter.lora_B @ adapter.lora_A


def test_cat_equals_the_adapters_summed_whatever_their_ranks_scales_and_layers():
    model = with_adapters(tiny_llama(), LoRA(r=2, alpha=4, target_modules=["q_proj", "v_proj"], adapter_name="a"),
                          LoRA(r=4, alpha=16, use_rslora=True, target_modules=["v_proj", "o_proj"], adapter_name="b"))
    combine_adapters(model, {"a": 1.0, "b": 1.0}, new_name="ab", how="cat")
    torch.testing.assert_close(logits(model, "ab"), logits(model, "a", "b"), atol=1e-5, rtol=1e-5)
    combine_adapters(model, {"a": 0.7, "b": -0.3}, new_name="weighted", how="cat")
    for layer in lora_layers(model):
        expected = sum(scaled_update(layer.adapters[n], w) for n, w in (("a", 0.7), ("b", -0.3)) if n in layer.adapters)
        torch.testing.assert_close(layer.adapters["weighted"].update(), expected, atol=1e-6, rtol=1e-5)
        assert layer.adapters["weighted"].r == 6 and layer.adapters["weighted"].scale == 1.0


def test_linear_of_rslora_adapters_is_the_closed_form():
    model = with_adapters(tiny_llama(), *(LoRA(r=4, alpha=alpha, use_rslora=True, target_modules=["q_proj"],
                                               adapter_name=name) for name, alpha in (("a", 8), ("b", 3))))
    weights = {"a": 0.6, "b": -0.5}
    combine_adapters(model, weights, new_name="ab", how="linear")
    for layer in lora_layers(model):
        a, b = layer.adapters["a"], layer.adapters["b"]
        assert a.scale == 8 / math.sqrt(4)  # rsLoRA's scale, not alpha / r
        c = {n: math.sqrt(abs(w) * layer.adapters[n].scale) for n, w in weights.items()}
        expected = (c["a"] * a.lora_B + c["b"] * b.lora_B) @ (c["a"] * a.lora_A - c["b"] * b.lora_A)
        torch.testing.assert_close(layer.adapters["ab"].update(), expected, atol=1e-6, rtol=1e-5)


def test_linear_of_dora_adapters_is_the_closed_form():
    model = with_adapters(tiny_llama(), *(LoRA(r=4, alpha=8, use_dora=True, target_modules=["q_proj"],
                                               adapter_name=name) for name in "ab"))
    weights = {"a": 0.7, "b": 0.5}  # not summing to 1: the base norm's share counts
    combine_adapters(model, weights, new_name="ab", how="linear")
    x = torch.randn(3, 32)
    for layer in lora_layers(model):
        weight = layer.base_layer.weight
        c = {n: math.sqrt(w * layer.adapters[n].scale) for n, w in weights.items()}
        direction = weight + sum(c[n] * layer.adapters[n].lora_B for n in "ab") @ sum(
            c[n] * layer.adapters[n].lora_A for n in "ab")
        base_norm = weight.norm(dim=1)
        magnitude = base_norm + sum(w * (layer.adapters[n].magnitude - base_norm) for n, w in weights.items())
        expected = F.linear(x, magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True))
        layer.set_active(["ab"])
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_svd_refactors_the_exact_sum_to_the_chosen_rank():
    model = with_adapters(tiny_llama(), LoRA(r=2, target_modules=["k_proj"], adapter_name="a"),
                          LoRA(r=3, target_modules=["k_proj"], adapter_name="b"))
    combine_adapters(model, {"a": 1.0, "b": 0.5}, new_name="full", how="svd", rank=5)
    combine_adapters(model, {"a": 1.0, "b": 0.5}, new_name="low", how="svd", rank=2)
    for layer in lora_layers(model):
        exact = scaled_update(layer.adapters["a"], 1.0) + scaled_update(layer.adapters["b"], 0.5)
        torch.testing.assert_close(layer.adapters["full"].update(), exact, atol=1e-5, rtol=1e-4)
        u, s, vh = torch.linalg.svd(exact)
        torch.testing.assert_close(layer.adapters["low"].update(), u[:, :2] @ torch.diag(s[:2]) @ vh[:2],
                                   atol=1e-5, rtol=1e-4)


def test_ties_and_dare_prune_elect_and_rescale():
    model = with_adapters(tiny_llama(), *(LoRA(r=4, target_modules=["q_proj"], adapter_name=n) for n in "ab"))
    combine_adapters(model, {"a": 1.0}, new_name="ties_one", how="ties", density=1.0)
    combine_adapters(model, {"a": 0.8, "b": 0.4}, new_name="dare_full", how="dare_linear", density=1.0)
    combine_adapters(model, {"a": 0.8, "b": 0.4}, new_name="linear", how="linear")
    combine_adapters(model, {"a": 0.8, "b": 0.4}, new_name="ties", how="ties", density=0.25)
    for seed, name in ((0, "dare0"), (0, "dare0_again"), (1, "dare1")):
        combine_adapters(model, {"a": 0.8, "b": 0.4}, new_name=name, how="dare_ties", density=0.5, seed=seed)
    for layer in lora_layers(model):
        adapters = layer.adapters
        torch.testing.assert_close(adapters["ties_one"].update(), scaled_update(adapters["a"], 1.0))
        torch.testing.assert_close(adapters["dare_full"].update(), adapters["linear"].update())
        a, b = (t * (t.abs() >= t.abs().flatten().topk(t.numel() // 4).values[-1])  # their top 25%
                for t in (adapters["a"].lora_A, adapters["b"].lora_A))
        sign = torch.where(a + b >= 0, 1.0, -1.0)  # elected on the factors as they are, as peft does
        agree_a, agree_b = a.sign() == sign, b.sign() == sign
        ca, cb = (math.sqrt(w * adapters[n].scale) for n, w in (("a", 0.8), ("b", 0.4)))
        expected = (ca * a * agree_a + cb * b * agree_b) / (agree_a.float() + agree_b.float()).clamp(min=1)
        torch.testing.assert_close(adapters["ties"].lora_A, expected)
        assert torch.equal(adapters["dare0"].lora_A, adapters["dare0_again"].lora_A)
        assert not torch.equal(adapters["dare0"].lora_A, adapters["dare1"].lora_A)


@pytest.mark.parametrize("how, settings", [("ties", {}), ("ties", {"majority_sign": "frequency"}),
                                           ("dare_linear", {"density": 1.0}), ("linear", {})])
def test_ties_and_linear_equal_peft_s_add_weighted_adapter(how, settings):
    peft = pytest.importorskip("peft")
    base = tiny_llama().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                                 adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
    ours = with_adapters(copy.deepcopy(base), *(LoRA(r=4, alpha=alpha, target_modules=["q_proj"], adapter_name=name)
                                                for name, alpha in (("a", 8), ("b", 16))))
    values = {f"{module}.{name}": param for module, layer in peft_layers(ours)
              for name, param in layer.named_parameters() if "lora_" in name}  # e.g. ...q_proj.adapters.a.lora_A
    with torch.no_grad():
        for key, param in theirs.named_parameters():
            if "lora_" in key:  # ...q_proj.lora_A.a.weight
                module, factor, name = key.removeprefix("base_model.model.").removesuffix(".weight").rsplit(".", 2)
                param.copy_(values[f"{module}.adapters.{name}.{factor}"])
    theirs.add_weighted_adapter(["a", "b"], [0.9, 0.3], "ab", combination_type=how,
                                density=settings.get("density", 0.5),
                                majority_sign_method=settings.get("majority_sign", "total"))
    combine_adapters(ours, {"a": 0.9, "b": 0.3}, new_name="ab", how=how, **settings)
    theirs.set_adapter("ab")
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, "ab"), theirs(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["ties", "dare_linear", "dare_ties"])
def test_one_input_combines_as_linear_as_in_peft(how):
    model = with_adapters(tiny_llama().eval(), LoRA(r=4, target_modules=["q_proj"], adapter_name="a"))
    combine_adapters(model, {"a": 0.7}, new_name="pruned", how=how, density=0.3)  # was: pruned to 30%
    combine_adapters(model, {"a": 0.7}, new_name="linear", how="linear")
    torch.testing.assert_close(logits(model, "pruned"), logits(model, "linear"), rtol=0, atol=0)


def test_peft_loads_the_combined_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama().eval()
    model = with_adapters(copy.deepcopy(base), LoRA(r=2, use_rslora=True, target_modules=["q_proj"], adapter_name="a"),
                          LoRA(r=4, use_dora=False, target_modules=["q_proj", "v_proj"], adapter_name="b"))
    combine_adapters(model, {"a": 0.5, "b": 0.5}, new_name="ab", how="cat")
    save_adapter(model, tmp_path, adapter_name="ab")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, logits(model, "ab"), atol=1e-5, rtol=1e-5)


def test_combining_on_a_quantized_base():
    model = tiny_llama()
    QuantizeBase("int8").inject(model)
    model = with_adapters(model, *(LoRA(r=2, target_modules=["q_proj", "v_proj"], adapter_name=n) for n in "ab"))
    combine_adapters(model, {"a": 1.0, "b": 1.0}, new_name="ab", how="cat")
    torch.testing.assert_close(logits(model, "ab"), logits(model, "a", "b"), atol=1e-4, rtol=1e-4)


def test_bad_combinations_are_one_clear_error_and_change_nothing():
    model = with_adapters(tiny_llama(), LoRA(r=2, target_modules=["q_proj"], adapter_name="a"),
                          LoRA(r=4, target_modules=["q_proj"], adapter_name="b"),
                          LoRA(r=2, use_dora=True, target_modules=["q_proj"], adapter_name="d"),
                          LoRA(r=2, init="pissa", target_modules=["v_proj"], adapter_name="p"))
    before = {n: p.clone() for n, p in model.named_parameters()}
    cases = [({"a": 1, "c": 1}, {}, "no adapter named 'c'"),
             ({"a": 1, "b": 1}, {"how": "linear"}, "need one rank; got a: r=2, b: r=4"),
             ({"a": 1, "d": 1}, {"how": "cat"}, "cannot mix DoRA and plain LoRA"),
             ({"a": 1, "p": 1}, {"how": "cat"}, "'p' is a PiSSA adapter, whose top-r part of W the base"),
             ({"a": 1}, {"new_name": "b"}, "already has an adapter named 'b'"),
             ({"a": 1}, {"how": "mean"}, "how"),
             ({"a": 1}, {"how": "ties", "density": 0}, "density must be in"),
             ({"a": 1, "b": 1}, {"how": "ties", "majority_sign": "totl"}, "majority_sign must be one of"),
             ({"a": 1, "b": 1}, {"how": "svd", "rank": 0}, "rank must be a positive integer, got 0"),
             ({"a": 1, "b": 1}, {"how": "cat", "rank": 1}, "rank sets the rank of how='svd' alone"),
             ({"a": math.nan, "b": 1}, {"how": "cat"}, "the weight of 'a' must be a finite number, got nan"),
             ({}, {}, "weights is empty")]
    for weights, settings, message in cases:
        with pytest.raises(ValueError, match=message):
            combine_adapters(model, weights, **{"new_name": "new", **settings})
    assert dict(model.named_parameters()).keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    set_adapter(model, "a")  # the model still works as it did


def test_modules_trained_whole_combine_as_task_vectors_and_one_input_at_weight_one_is_itself():
    heads = {"modules_to_save": ["classifier"]}
    model = with_adapters(tiny_bert(), LoRA(r=2, target_modules=["query"], adapter_name="a", **heads),
                          LoRA(r=2, target_modules=["value"], adapter_name="b", **heads))
    combine_adapters(model, {"a": 1.0}, new_name="a_again", how="cat")
    torch.testing.assert_close(logits(model, "a_again"), logits(model, "a"), atol=1e-6, rtol=1e-6)  # was: the
    combine_adapters(model, {"a": 0.7, "b": -0.3}, new_name="ab", how="cat")  # original, untrained head computed
    head = model.classifier
    for tensor in ("weight", "bias"):
        original, a, b = (getattr(m, tensor) for m in (head.base_layer, head.adapters["a"], head.adapters["b"]))
        torch.testing.assert_close(getattr(head.adapters["ab"], tensor), original + 0.7 * (a - original) - 0.3 * (
            b - original))


def test_a_head_with_running_statistics_combines_them_too():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    LoRA(r=2, target_modules=["0"], modules_to_save=["1"], adapter_name="a").inject(model)
    with torch.no_grad():
        model.train()(torch.randn(16, 8) * 3 + 2)  # a's copy of the norm gathers statistics
    combine_adapters(model, {"a": 1.0}, new_name="a_again", how="cat")
    combine_adapters(model, {"a": -1.0}, new_name="minus_a", how="cat")  # subtracts the task, not its statistics
    norm = model[1].adapters
    for statistic in ("running_mean", "running_var"):  # was: the original's, so outputs differed by 0.36
        torch.testing.assert_close(getattr(norm["a_again"], statistic), getattr(norm["a"], statistic))
        torch.testing.assert_close(getattr(norm["minus_a"], statistic), getattr(norm["a"], statistic))

