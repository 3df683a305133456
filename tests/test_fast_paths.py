"""The fast paths give the plain formulas' numbers: fused LoRA with its compact dropout masks, against peft."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_lora_vs_peft import _copy_random_adapters, _peft_key
from torch import nn

import lightning_peft.core.dropout as dropout_module
import lightning_peft.lora.fused as fused_module
from lightning_peft import LoRA
from lightning_peft.core.dropout import Dropout, keep_mask

from conftest import VOCAB, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


class Recorder:
    """Wraps ``keep_mask`` to keep every mask drawn, in call order."""

    def __init__(self, monkeypatch):
        self.masks: list[torch.Tensor] = []
        real = dropout_module.keep_mask

        def record(shape, p, device):
            mask = real(shape, p, device)
            self.masks.append(mask)
            return mask

        monkeypatch.setattr(dropout_module, "keep_mask", record)


class Replay(nn.Module):
    """peft's dropout slot fed with our recorded masks, in the order its layers run."""

    def __init__(self, masks: list[torch.Tensor], p: float):
        super().__init__()
        self.masks, self.p = masks, p

    def forward(self, x):
        return x * self.masks.pop(0).to(x.dtype) / (1 - self.p)


def _pair(dropout: float, dora: bool):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = tiny_llama()
        config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, use_dora=dora)
        theirs = get_peft_model(copy.deepcopy(base), config)
    ours = LoRA(r=4, alpha=8, dropout=dropout, use_dora=dora, target_modules=TARGETS).inject(copy.deepcopy(base))
    _copy_random_adapters(theirs, ours)
    return theirs.train(), ours.train()


def _step(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, the embedding output's gradient and every adapter gradient of one backward."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    (logits.square().mean() + logits[..., 0].sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits, embeds.grad, grads


def _assert_equal_up_to_rounding(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-5 of the tensor's largest element: sums in another order differ in the last bits only."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize(("dropout", "dora", "fused"), [(0.0, False, "FusedLoRALinear"),
                                                         (0.1, False, "FusedLoRALinear"),
                                                         (0.0, True, "FusedDoRALinear"),
                                                         (0.1, True, None)])  # DoRA with dropout: the plain path
def test_fast_lora_and_dora_match_peft_with_the_same_masks(dropout, dora, fused, monkeypatch):
    theirs, ours = _pair(dropout, dora)
    fused_calls = []
    for name in ("FusedLoRALinear", "FusedDoRALinear"):
        function = getattr(fused_module, name)
        monkeypatch.setattr(function, "apply", lambda *a, n=name, f=function.apply: fused_calls.append(n) or f(*a))
    recorder = Recorder(monkeypatch)
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
    logits, grad_input, grads = _step(ours, ids)
    assert fused_calls == ([fused] * 2 * len(TARGETS) if fused else [])  # every adapted layer took the path
    assert len(recorder.masks) == (2 * len(TARGETS) if dropout else 0)
    if dropout:
        for layer in theirs.modules():
            if hasattr(layer, "lora_dropout"):
                layer.lora_dropout["default"] = Replay(recorder.masks, dropout)
    their_logits, their_grad_input, their_grads = _step(theirs, ids)
    assert not recorder.masks  # peft consumed every mask, in the same order
    _assert_equal_up_to_rounding(logits, their_logits)
    _assert_equal_up_to_rounding(grad_input, their_grad_input)
    their_params = dict(theirs.named_parameters())
    checked = 0
    for name, grad in grads.items():
        layer_name, what = name.rsplit(".adapters.default.", 1)
        _assert_equal_up_to_rounding(grad, their_grads[_peft_key(their_params, layer_name, what)])
        checked += 1
    assert checked == (3 if dora else 2) * 2 * len(TARGETS)


@pytest.mark.parametrize("dora", [False, True])
def test_a_model_that_changes_an_adapted_output_in_place_trains_on_the_fused_path(dora):
    class HalvesInPlace(nn.Module):  # as Longformer's query /= sqrt(d), or Wav2Vec2's masking
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 6)

        def forward(self, x):
            y = self.fc(x)
            y /= 2
            return y

    torch.manual_seed(0)
    model = LoRA(r=2, target_modules=["fc"], use_dora=dora).inject(HalvesInPlace())
    with torch.no_grad():
        model.fc.adapters.default.lora_B.normal_()
    x = torch.randn(2, 3, 8)
    model(x).square().sum().backward()  # was: "Output 0 of FusedLoRALinear is a view and is being modified inplace"
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    plain = model.fc.adapters.default
    expected = (model.fc.base_layer(x) + model.fc.delta(x, model.fc.base_layer(x), plain)) / 2
    expected.square().sum().backward()  # the layer's plain formula
    for name, grad in fused.items():
        _assert_equal_up_to_rounding(grad, dict(model.named_parameters())[name].grad)


def test_masks_differ_between_layers_with_the_same_input(monkeypatch):
    model = LoRA(r=4, dropout=0.25, target_modules=["q_proj", "k_proj", "v_proj"]).inject(tiny_llama(layers=1))
    recorder = Recorder(monkeypatch)
    model.train()(torch.randint(0, VOCAB, (4, 64)))
    q, k, v = recorder.masks  # one mask per layer, all for the same normed hidden states
    assert q.shape == k.shape == v.shape == (4, 64, 32)
    for a, b in [(q, k), (q, v), (k, v)]:
        agree = (a == b).float().mean().item()  # independent masks agree on 0.75^2 + 0.25^2 = 0.625 of elements
        assert abs(agree - 0.625) < 0.03, agree


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_and_independence(p):
    mask = keep_mask((1000, 1000), p, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    rate = mask.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / 1e6) ** 0.5 + 1e-5, rate
    # Neighbours (the four draws that share a 64-bit word, and the next row) are independent.
    for a, b in [(mask[:, :-1], mask[:, 1:]), (mask[:-1], mask[1:])]:
        both = (a & b).float().mean().item()
        assert abs(both - (1 - p) ** 2) < 0.005, both


def test_masks_follow_torchs_seed():
    torch.manual_seed(3)
    first, second = keep_mask((64, 64), 0.1, torch.device("cpu")), keep_mask((64, 64), 0.1, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(keep_mask((64, 64), 0.1, torch.device("cpu")), first)  # a recomputation draws the same mask
    assert not torch.equal(first, second)


def test_dropout_module_is_nn_dropouts_semantics():
    drop, x = Dropout(0.2), (torch.randn(200, 300) + 5).requires_grad_()
    out = drop.train()(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.8)
    out.backward(torch.full_like(out, 3.0))
    torch.testing.assert_close(x.grad, kept * 3.0 / 0.8)  # the gradient goes through the same mask
    assert abs(kept.float().mean().item() - 0.8) < 0.01
    assert drop.eval()(x) is x and Dropout(0.0).train()(x) is x


def _int8_pair():
    """Our int8 layer and bitsandbytes' own on the same quantized weight and a trainable bias."""
    bnb = pytest.importorskip("bitsandbytes")
    from lightning_peft.quantization.layers import quantize_linear

    plain = nn.Linear(48, 40)
    ours = quantize_linear(plain, "int8").train()
    theirs = quantize_linear(plain, "int8").train()
    theirs.__class__ = bnb.nn.Linear8bitLt  # bitsandbytes' forward on the very same state
    return ours, theirs


def test_int8_training_path_equals_bitsandbytes():
    ours, theirs = _int8_pair()
    x = torch.randn(2, 7, 48)
    results = []
    for layer in (ours, theirs):
        inp = x.clone().requires_grad_()
        out = layer(inp)
        out.backward(torch.cos(out.detach()))
        results.append((out, inp.grad, layer.bias.grad))
        layer.bias.grad = None
    (out, grad_x, grad_bias), (their_out, their_grad_x, their_grad_bias) = results
    torch.testing.assert_close(out, their_out, rtol=0, atol=0)
    torch.testing.assert_close(grad_x, their_grad_x, rtol=0, atol=0)
    torch.testing.assert_close(grad_bias, their_grad_bias, rtol=1e-6, atol=1e-6)  # summed in another order


def test_int8_training_path_does_not_keep_its_input():
    import weakref

    # bitsandbytes keeps it: the check can fail
    for layer, keeps in zip(_int8_pair(), (False, True), strict=True):
        layer.bias.requires_grad_(False)
        inp = torch.randn(2, 7, 48, requires_grad=True) * 2  # an intermediate, as the input of a model's layer is
        alive = weakref.ref(inp)
        out = layer(inp)
        del inp
        assert (alive() is not None) is keeps
        out.sum().backward()


def test_gradient_checkpointing_recomputes_the_same_masks():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = LoRA(r=4, dropout=0.3, target_modules=TARGETS).inject(tiny_llama()).train()
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(7)
        ids = torch.randint(0, VOCAB, (2, 9))
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and len(plain) == 4 * len(TARGETS)
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7)


def test_the_dropout_temporaries_reuse_one_buffer_per_slot_and_thread_on_cpu():
    import threading

    from lightning_peft.lora.fused import scratch

    big, small = torch.empty(64, 48), torch.empty(8, 48)
    first = scratch(0, big)
    assert scratch(0, small).data_ptr() == scratch(0, big).data_ptr() == first.data_ptr()  # every layer, one buffer
    assert scratch(1, big).data_ptr() != first.data_ptr()  # the other temporary: its own
    other_thread = []
    worker = threading.Thread(target=lambda: other_thread.append(scratch(0, big).data_ptr()))
    worker.start()
    worker.join()
    assert other_thread[0] != first.data_ptr()
    assert scratch(0, small).shape == (8, 48)
