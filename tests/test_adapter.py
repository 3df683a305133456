"""Bottleneck adapters: where they go, what trains, step 0, resume, stacking with LoRA, errors."""

import pytest
import torch
from torch import nn

from lightning_peft import LoRA, merge, trainable_summary
from lightning_peft.additive import Adapter
from lightning_peft.additive.adapter_layers import AdapterLayer

from conftest import (
    ConvMLP,
    ImageModule,
    TokenModule,
    check_resume_reproduces_the_uninterrupted_run,
    image_loader,
    make_trainer,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_loader,
)

B = 4  # bottleneck of the tests
R = 4  # LoRA rank when stacked
H = 32  # hidden size of the tiny transformers models
KV = 16  # tiny Llama: 2 key/value heads of 8

# Per architecture: the model, the block prefix, and its (attention output, feed-forward output) projections.
ARCHS = {
    "llama": (tiny_llama, "model.model.layers", ("self_attn.o_proj", "mlp.down_proj")),
    "bert": (tiny_bert, "model.bert.encoder.layer", ("attention.output.dense", "output.dense")),
    "gpt2": (tiny_gpt2, "model.transformer.h", ("attn.c_proj", "mlp.c_proj")),
}
PLACEMENTS = ("houlsby", "pfeiffer")


def per_insertion(hidden: int, bottleneck: int = B) -> int:
    """down (hidden x b + b) and up (b x hidden + hidden)."""
    return 2 * hidden * bottleneck + bottleneck + hidden


def expected_count(model: nn.Module, placement: str) -> int:
    config = model.config
    insertions = (2 if placement == "houlsby" else 1) * config.num_hidden_layers
    return insertions * per_insertion(config.hidden_size)


def expected_places(arch: str, placement: str) -> list[str]:
    _, prefix, (attention, feedforward) = ARCHS[arch]
    places = (attention, feedforward) if placement == "houlsby" else (feedforward,)
    return [f"{prefix}.{block}.{place}" for block in range(2) for place in places]


def adapter_layer_names(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, AdapterLayer)]



@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_insertion_points_per_architecture(arch, placement):
    module = TokenModule(ARCHS[arch][0]())
    Adapter(bottleneck_dim=B, placement=placement).inject(module)
    assert adapter_layer_names(module) == expected_places(arch, placement)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_adapter_parameters(arch, placement):
    module = TokenModule(ARCHS[arch][0]())
    base_before = {n: p.detach().clone() for n, p in module.named_parameters()}
    make_trainer([Adapter(bottleneck_dim=B, placement=placement)], max_steps=2).fit(module, token_loader())

    formula = expected_count(module.model, placement)
    summary = trainable_summary(module)
    assert summary.trainable == formula
    assert {row.method: row.params for row in summary.methods} == {"Adapter[default]": formula}
    for name, param in module.named_parameters():
        if ".adapters." in name:
            assert param.requires_grad, name
        else:
            assert torch.equal(param, base_before[name.replace(".base_layer", "")]), f"base weight {name} changed"
            assert not param.requires_grad, name
    ups = [p for n, p in module.named_parameters() if n.endswith("up.weight")]
    assert ups and all(p.abs().sum() > 0 for p in ups)  # the zero-initialised up-projections trained


@pytest.mark.parametrize("arch", ARCHS)
def test_step_zero_output_equals_base(arch):
    module = TokenModule(ARCHS[arch][0]()).eval()
    batch = next(iter(token_loader()))[0]
    before = module(batch)
    Adapter(bottleneck_dim=B, activation="tanh", dropout=0.1).inject(module)
    assert adapter_layer_names(module)
    assert torch.equal(module(batch), before)


def test_a_bf16_base_keeps_fp32_adapters_and_its_output():
    model = tiny_llama().to(torch.bfloat16).eval()
    ids = next(iter(token_loader()))[0]
    before = model(input_ids=ids).logits
    Adapter(bottleneck_dim=B).inject(model)
    adapters = [p for n, p in model.named_parameters() if ".adapters." in n]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    assert torch.equal(model(input_ids=ids).logits, before)


def seeded_llama():
    """The same base (and the same adapter initialisation after it) on every call."""
    torch.manual_seed(0)
    return tiny_llama()


def test_resume_from_adapter_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    saved = check_resume_reproduces_the_uninterrupted_run(
        lambda: TokenModule(seeded_llama()), lambda: [Adapter(bottleneck_dim=B)], tmp_path)
    assert all(".adapters.default." in key for key in saved)


def test_merge_refuses_adapters_and_leaves_the_model_as_it_was():
    model = tiny_llama()
    Adapter(bottleneck_dim=B).inject(model)
    names = adapter_layer_names(model)
    with pytest.raises(ValueError, match="Adapter adapters cannot be merged"):
        merge(model)
    assert adapter_layer_names(model) == names


@pytest.mark.parametrize("lora_targets, lora_params", [
    (["q_proj", "v_proj"], 2 * (R * (H + H) + R * (H + KV))),
    (["q_proj", "v_proj", "o_proj"], 2 * (R * (H + H) + R * (H + KV) + R * (H + H))),  # o_proj carries both
])
def test_stacking_with_lora_trains_the_union(lora_targets, lora_params):
    module = TokenModule(tiny_llama())
    base_before = {n: p.detach().clone() for n, p in module.named_parameters()}
    callbacks = [LoRA(r=R, alpha=8, target_modules=lora_targets, adapter_name="lora"),
                 Adapter(bottleneck_dim=B, adapter_name="bottleneck")]
    make_trainer(callbacks, max_steps=2).fit(module, token_loader())

    adapter_params = expected_count(module.model, "houlsby")
    summary = trainable_summary(module)
    assert {row.method: row.params for row in summary.methods} == {
        "LoRA[lora]": lora_params, "Adapter[bottleneck]": adapter_params}
    assert summary.trainable == lora_params + adapter_params
    for name, param in module.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, base_before[name.replace(".base_layer", "")]), name
    trained = {n for n, p in module.named_parameters() if p.requires_grad and p.abs().sum() > 0}
    assert any(n.endswith("lora_B") for n in trained) and any(n.endswith("up.weight") for n in trained)


@pytest.mark.parametrize("targets", [["fc1"], r".*\.fc\d"])
def test_explicit_target_modules_on_a_plain_torch_model(targets):
    module = ImageModule(ConvMLP())
    x = next(iter(image_loader()))[0]
    before = module(x)
    adapter = Adapter(bottleneck_dim=B, activation="relu", target_modules=targets)
    adapter.inject(module)
    assert torch.equal(module(x), before)

    make_trainer([adapter], max_steps=2).fit(module, image_loader())
    wrapped = ["model.fc1"] if targets == ["fc1"] else ["model.fc1", "model.fc2"]
    assert adapter_layer_names(module) == wrapped
    assert trainable_summary(module).trainable == per_insertion(32) + (0 if len(wrapped) == 1 else per_insertion(3))
    assert module.model.fc1.adapters["default"].up.weight.abs().sum() > 0


def test_named_adapters_on_one_layer_apply_in_sequence():
    model = tiny_llama()
    Adapter(bottleneck_dim=B, adapter_name="first").inject(model)
    Adapter(bottleneck_dim=2, activation="silu", adapter_name="second").inject(model)
    layer = model.model.layers[0].mlp.down_proj
    assert list(layer.adapters) == ["first", "second"] and layer.active_adapters == ["first", "second"]
    assert trainable_summary(model).trainable == 4 * (per_insertion(H) + per_insertion(H, 2))

    for adapter in layer.adapters.values():
        nn.init.normal_(adapter.up.weight)  # make each adapter change its input
    x = torch.randn(3, 2 * H)
    first, second = layer.adapters["first"], layer.adapters["second"]
    assert torch.equal(layer(x), second(first(layer.base_layer(x))))
    assert not torch.allclose(layer(x), first(second(layer.base_layer(x))))


def test_unknown_architecture_without_targets_names_the_fix_before_any_change():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=128, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    module = TokenModule(MixtralForCausalLM(config))  # fused experts: no feed-forward output projection to follow
    keys = set(module.state_dict())
    with pytest.raises(ValueError) as info:
        make_trainer([Adapter(bottleneck_dim=B)], max_steps=1).fit(module, token_loader())
    assert "llama (self_attn.o_proj / mlp.down_proj)" in str(info.value) and "target_modules" in str(info.value)
    assert set(module.state_dict()) == keys

    Adapter(bottleneck_dim=B, target_modules=["o_proj"]).inject(module)
    assert len(adapter_layer_names(module)) == 2


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_model_with_some_mixture_of_experts_blocks_is_refused_without_targets(placement):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(vocab_size=128, hidden_size=H, intermediate_size=2 * H, moe_intermediate_size=H,
                            shared_expert_intermediate_size=H, num_experts=4, num_experts_per_tok=2,
                            num_hidden_layers=4, decoder_sparse_step=2, num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2MoeForCausalLM(config)  # blocks 0 and 2 dense (mlp.down_proj), 1 and 3 experts
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=r"2 of the model's 4 blocks \(model\.layers\.1, model\.layers\.3\) have "
                                         r"no mlp\.down_proj"):  # was: adapters on the dense blocks only, silently
        Adapter(bottleneck_dim=B, placement=placement).inject(model)
    assert set(model.state_dict()) == keys


def test_a_plain_torch_model_without_targets_is_an_error():
    with pytest.raises(ValueError, match="found no block output projections.*target_modules"):
        Adapter().inject(ConvMLP())


@pytest.mark.parametrize("targets, error, words", [
    (["fc3"], ValueError, ["fc3", "matched no module", "fc1 (Linear)"]),
    (["conv"], TypeError, ["conv", "Conv2d"]),
])
def test_bad_target_modules(targets, error, words):
    model = ConvMLP()
    with pytest.raises(error) as info:
        Adapter(target_modules=targets).inject(model)
    assert all(word in str(info.value) for word in words)
    assert not adapter_layer_names(model)


def test_an_adapter_layer_needs_a_linear_base():
    with pytest.raises(TypeError, match="Conv2d"):
        AdapterLayer(nn.Conv2d(1, 4, 3))


def test_injecting_the_same_adapter_name_twice_is_an_error():
    model = tiny_llama()
    Adapter(bottleneck_dim=B).inject(model)
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=r"Adapter\[default\] is in this model already, made with placement='houlsby'"):
        Adapter(bottleneck_dim=B, placement="pfeiffer").inject(model)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("kwargs", [
    dict(bottleneck_dim=0), dict(bottleneck_dim=-1), dict(bottleneck_dim=2.5), dict(bottleneck_dim=True),
    dict(placement="parallel"), dict(activation="swish"), dict(dropout=1.0), dict(dropout=-0.1),
    dict(checkpoint="half"),
])
def test_bad_hyperparameters_fail_at_construction(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Adapter(**kwargs)
