"""hotswap_adapter: another adapter's values in an existing slot, without recompiling a compiled model."""

import copy

import pytest
import torch

from lightning_peft import (
    IA3,
    Adapter,
    LoRA,
    PrefixTuning,
    PromptTuning,
    hotswap_adapter,
    load_adapter,
    save_adapter,
)

from conftest import VOCAB, tiny_llama

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def base():
    return tiny_llama().eval()


def saved(base, folder, method):
    """An adapter with random values on a copy of ``base``, saved to ``folder``."""
    model = method.inject(copy.deepcopy(base))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    save_adapter(model, folder)
    return folder


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def fresh(base, folder, ids):
    """What the adapter in ``folder`` computes when loaded the usual way."""
    return logits(load_adapter(copy.deepcopy(base), folder), ids)


def test_swapping_three_adapters_into_a_compiled_model_recompiles_nothing(base, tmp_path):
    files = [saved(base, tmp_path / "same", LoRA(r=8, alpha=16, target_modules=TARGETS)),
             saved(base, tmp_path / "lower-rank", LoRA(r=4, alpha=8, target_modules=TARGETS)),
             saved(base, tmp_path / "rslora", LoRA(r=2, alpha=32, use_rslora=True, target_modules=TARGETS))]
    model = LoRA(r=8, alpha=16, target_modules=TARGETS).inject(copy.deepcopy(base)).eval()
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    ids = torch.randint(0, VOCAB, (2, 6))
    logits(compiled, ids)
    compiled_once = len(graphs)
    assert compiled_once > 0
    outputs = []
    for folder in files:
        hotswap_adapter(model, folder)
        outputs.append(logits(compiled, ids))
        torch.testing.assert_close(outputs[-1], fresh(base, folder, ids), atol=1e-5, rtol=1e-5)
    assert len(graphs) == compiled_once  # no recompilation
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)  # each swap changed what the model computes


def test_dora_ia3_and_prompts_swap_in_place(base, tmp_path):
    ids = torch.randint(0, VOCAB, (2, 6))
    for method in (lambda: LoRA(r=4, use_dora=True, target_modules=TARGETS),
                   lambda: IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                   lambda: PromptTuning(num_virtual_tokens=3)):
        folder = saved(base, tmp_path / type(method()).__name__, method())
        model = method().inject(copy.deepcopy(base)).eval()
        parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        hotswap_adapter(model, folder)
        assert {n: p for n, p in model.named_parameters() if p.requires_grad} == parameters  # the same objects
        torch.testing.assert_close(logits(model, ids), fresh(base, folder, ids), atol=1e-5, rtol=1e-5)


def test_a_file_that_does_not_fit_the_slot_changes_nothing(base, tmp_path):
    model = LoRA(r=4, target_modules=TARGETS).inject(copy.deepcopy(base))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cases = {
        "rank 8, above the slot's r=4": LoRA(r=8, target_modules=TARGETS),
        "must adapt the same layers": LoRA(r=4, target_modules=["q_proj"]),
        "no adapter named 'default' of method IA3": IA3(target_modules=["k_proj"], feedforward_modules=[]),
    }
    for message, method in cases.items():
        folder = saved(base, tmp_path / message.split()[0], method)
        with pytest.raises(ValueError, match=message):
            hotswap_adapter(model, folder)
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        hotswap_adapter(model, tmp_path / "rank", adapter_name="other")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    prefixed = PrefixTuning(num_virtual_tokens=2).inject(copy.deepcopy(base))
    folder = saved(base, tmp_path / "prefix", PrefixTuning(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="computed from the adapter"):
        hotswap_adapter(prefixed, folder)


def test_a_swap_that_would_compute_against_other_base_weights_or_another_activation_is_refused(base, tmp_path):
    plain, pissa = LoRA(r=4, target_modules=TARGETS), LoRA(r=4, target_modules=TARGETS, init="pissa")
    cases = [  # (slot, file's method, message)
        (plain, pissa, "base weights hold W itself, and the file's adapter was trained against a rank-4 PiSSA"),
        (pissa, plain, "base weights hold a rank-4 PiSSA residual, and the file's adapter was trained against W "),
        (pissa, LoRA(r=2, target_modules=TARGETS, init="pissa"), "hold a rank-4 PiSSA residual, .* a rank-2 PiSSA"),
        (Adapter(bottleneck_dim=4), Adapter(bottleneck_dim=4, activation="relu"),
         "the file's adapter uses activation 'relu', the slot 'gelu'"),
        (plain, LoRA(r=4, target_modules=TARGETS, use_dora=True),  # was: "must adapt the same layers"
         "the slot is plain LoRA and the file's adapter DoRA; load it with load_adapter instead"),
        (LoRA(r=4, target_modules=TARGETS, use_dora=True), plain, "the slot is DoRA and the file's adapter plain LoRA"),
    ]
    for number, (slot, method, message) in enumerate(cases):
        model = slot.inject(copy.deepcopy(base))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        folder = saved(base, tmp_path / str(number), method)
        with pytest.raises(ValueError, match=message):
            hotswap_adapter(model, folder)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    model = pissa.inject(copy.deepcopy(base))  # a PiSSA file of the slot's rank fits it
    folder = saved(base, tmp_path / "pissa", LoRA(r=4, target_modules=TARGETS, init="pissa"))
    ids = torch.randint(0, VOCAB, (2, 6))
    torch.testing.assert_close(logits(hotswap_adapter(model, folder), ids), fresh(base, folder, ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["linear", "ties", "dare_linear", "dare_ties"])
def test_combining_and_hotswapping_keep_to_the_adapters_device(tmp_path, how):
    from lightning_peft import combine_adapters

    save_adapter(LoRA(r=2, target_modules=["q_proj"]).inject(tiny_llama()), tmp_path)
    model = LoRA(r=4, target_modules=["q_proj"], adapter_name="a").inject(tiny_llama())
    LoRA(r=4, target_modules=["q_proj"], adapter_name="b").inject(model)
    model.to("meta")  # stands in for a GPU: the file's tensors and the coefficients are made on the CPU
    combine_adapters(model, {"a": 0.5, "b": 0.5}, new_name="ab", how=how)  # was: "not on the expected device"
    hotswap_adapter(model, tmp_path, adapter_name="a")  # was: the same, padding a rank-2 file into a rank-4 slot
    assert {p.device.type for p in model.parameters()} == {"meta"}
