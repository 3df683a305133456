"""LoRA on weights a module reads itself: fused mixture-of-experts weights (peft's target_parameters) and
nn.MultiheadAttention's projections; the warning for weights that a target selection leaves out."""

import copy
import re
import warnings

import pytest
import torch
from architectures import MHAClassifier, llama, mixtral, qwen3_moe
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lightning_peft import IA3, LoRA, QuantizeBase, load_adapter, merge, save_adapter, trainable_summary, unmerge
from lightning_peft.lora.parameters import LoRAParameter

R = 4
IDS = torch.randint(4, 128, (2, 8), generator=torch.Generator().manual_seed(0))
MOE = pytest.mark.parametrize("build", [mixtral, qwen3_moe], ids=["mixtral", "qwen3_moe"])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def randomize_b(model: nn.Module) -> None:
    """Give every B a value, so the updates are not zero (they start at zero)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)


def all_linear_count(model: nn.Module) -> int:
    """r * (in + out) for each attention projection, and for each expert of each fused expert weight."""
    count = 0
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            count += R * sum(param.shape)
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, out, fan_in = param.shape
            count += experts * R * (out + fan_in)
    return count


@MOE
def test_all_linear_trains_every_expert_and_equals_peft_target_parameters(build, tmp_path):
    base = build().eval()
    ours = copy.deepcopy(base)
    LoRA(r=R, alpha=8).inject(ours)
    assert trainable_summary(ours).trainable == all_linear_count(base)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if n.endswith("mlp.gate.weight"))  # routers

    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=R, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    randomize_b(ours)
    ours_tensors = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    save_adapter(ours, tmp_path / "ours")
    assert len(ours_tensors) == len([p for p in theirs.parameters() if p.requires_grad])

    # The same A and B values through peft's own injection: copy ours into theirs by peft's keys.
    from safetensors.torch import load_file

    from_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(from_file[name.replace(".default", "")])
    assert torch.allclose(logits(theirs), logits(ours), atol=1e-5)

    # peft loads our file; we load peft's.
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert torch.allclose(logits(loaded), logits(ours), atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    again = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert torch.allclose(logits(again), logits(theirs), atol=1e-5)

    expected = logits(ours)
    merge(ours)
    assert not any(isinstance(m, LoRAParameter) for m in ours.modules())
    assert torch.allclose(logits(ours), expected, atol=1e-5)
    unmerge(ours)
    assert torch.allclose(logits(ours), expected, atol=1e-5)


@MOE
def test_a_peft_file_that_adapts_expert_weights_only_loads(build, tmp_path):
    base = build().eval()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=8, target_modules=None,
                                                            target_parameters=["experts.gate_up_proj"]))
    randomize_b(theirs)
    theirs.save_pretrained(tmp_path)  # peft writes "target_modules": [] here
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.allclose(logits(loaded), logits(theirs), atol=1e-5)


@MOE
def test_expert_updates_train_and_routers_stay_frozen(build):
    model = build()
    LoRA(r=R, alpha=8, target_modules=None, target_parameters=["experts.gate_up_proj"]).inject(model)
    before = logits(model)
    router = {n: p.clone() for n, p in model.named_parameters() if n.endswith("gate.weight")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model.train()(IDS).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.allclose(logits(model), before, atol=1e-4)
    assert all(torch.equal(p, router[n]) for n, p in model.named_parameters() if n in router)
    a = model.model.layers[0].mlp.experts.adapters.default.lora_A
    assert a.shape == (4 * R, model.config.hidden_size)  # one rank-R update per expert


@pytest.mark.parametrize("setting, words", [
    (dict(use_dora=True), "use_dora=True cannot apply to 'model.layers.0.mlp.experts.gate_up_proj'"),
    (dict(dropout=0.1), "dropout=0.1 cannot apply"),
    (dict(init="pissa"), "init='pissa' cannot apply"),
])
def test_settings_that_cannot_apply_to_fused_weights_named_are_refused_and_all_linear_leaves_them_out(setting,
                                                                                                       words):
    model = mixtral()
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=words):
        LoRA(r=R, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"], **setting).inject(model)
    assert set(model.state_dict()) == keys
    setting_words = words.split(" cannot")[0]
    with pytest.warns(UserWarning, match=rf"{re.escape(setting_words)}: all-linear leaves out "
                                         r"model\.layers\.0\.mlp\.experts\.gate_up_proj") as caught:
        LoRA(r=R, **setting).inject(model)  # all-linear: the layers take the setting, the fused experts are left out
    assert len(caught) == 1  # not also the generic warning about weights no layer reaches
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".q_proj." in n for n in trained) and not any("experts" in n for n in trained)


def test_target_parameters_that_match_nothing_list_the_weights_that_exist():
    with pytest.raises(ValueError, match=r"matched no parameter.*experts\.gate_up_proj \(4, 128, 32\)"):
        LoRA(target_modules=None, target_parameters=["experts.up_proj"]).inject(mixtral())


def test_quantize_base_keeps_the_experts_in_full_precision_and_says_so():
    model = mixtral()
    with pytest.warns(UserWarning, match="keeps 4 fused expert weights .* in full precision"):
        QuantizeBase("nf4").inject(model)
    LoRA(r=R).inject(model)
    assert trainable_summary(model).trainable == all_linear_count(mixtral())
    assert model.model.layers[0].mlp.experts.base_layer.base_layer.gate_up_proj.dtype == torch.float32


# --- nn.MultiheadAttention --------------------------------------------------------------------------
def test_multihead_attention_trains_merges_and_becomes_plain_again(tmp_path):
    base = MHAClassifier().eval()
    ids = IDS % 128
    model = copy.deepcopy(base)
    LoRA(r=R, target_modules=["attn"]).inject(model)
    assert trainable_summary(model).trainable == R * (16 + 48) + R * (16 + 16)  # in_proj (3 x 16 out), out_proj
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), base(ids))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model.train()(ids).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        trained = model.eval()(ids)
        assert not torch.allclose(trained, base(ids), atol=1e-4)
    save_adapter(model, tmp_path)
    with torch.no_grad():
        assert torch.allclose(load_adapter(copy.deepcopy(base), tmp_path).eval()(ids), trained, atol=1e-6)
        merge(model)
        assert type(model.attn) is nn.MultiheadAttention
        assert torch.allclose(model(ids), trained, atol=1e-5)


def test_multihead_attention_files_have_peft_s_keys_and_say_peft_adds_the_out_proj_update_twice(tmp_path):
    from safetensors.torch import load_file, save_file

    base = MHAClassifier().eval()
    ids = IDS % 128
    ours = LoRA(r=R, alpha=6, target_modules=["attn"]).inject(copy.deepcopy(base))
    randomize_b(ours)
    with pytest.warns(UserWarning, match=r"peft 0.21 adds the out_proj update twice \(huggingface/peft#3774\)"):
        save_adapter(ours, tmp_path / "ours")
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=6, target_modules=["attn"]))
    randomize_b(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    with pytest.warns(UserWarning, match="peft#3774"):  # was: refused, the out_proj tensors under other keys
        save_adapter(load_adapter(copy.deepcopy(base), tmp_path / "theirs"), tmp_path / "again")
    their_tensors = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert all(torch.equal(value, their_tensors[key])
               for key, value in load_file(tmp_path / "again" / "adapter_model.safetensors").items())
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert tensors.keys() == their_tensors.keys()
    out_b = "base_model.model.attn.base_layer.out_proj.lora_B.weight"
    save_file({**tensors, out_b: tensors[out_b] / 2}, tmp_path / "ours" / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        halved = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():  # peft counting half the update twice: each tensor went where peft reads it
        torch.testing.assert_close(halved(ids), ours.eval()(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["kdim", "shared"])
def test_every_projection_of_an_attention_saved_in_our_own_layout_loads_back(layout, tmp_path):
    from safetensors.torch import load_file

    def build():
        torch.manual_seed(0)
        model = nn.Module()
        if layout == "kdim":  # separate query, key and value weights, which peft's layout does not hold
            model.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=4)
        else:  # one attention at two places: peft's layout adapts one place
            model.attn = model.again = nn.MultiheadAttention(8, 2, batch_first=True)
        return model

    x = torch.randn(2, 5, 8)
    kv = (x[..., :6], x[..., :4]) if layout == "kdim" else (x, x)
    model = LoRA(r=2, target_modules=["attn"]).inject(build())
    randomize_b(model)
    with pytest.warns(UserWarning, match="saved in lightning-peft's own layout"):
        save_adapter(model, tmp_path)
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == sum(p.requires_grad for p in model.parameters())
    loaded = load_adapter(build(), tmp_path)
    with torch.no_grad():  # was: one key for every projection's update, so k's and v's (or in_proj's) were lost
        torch.testing.assert_close(loaded.attn(x, *kv)[0], model.attn(x, *kv)[0], rtol=0, atol=1e-6)


def test_one_adapted_parameter_of_a_module_keeps_its_own_layout_key(tmp_path):
    from safetensors.torch import load_file

    model = mixtral()
    model.model.layers[1].mlp.experts = model.model.layers[0].mlp.experts  # at two places: our own layout
    LoRA(r=2, target_modules=None, target_parameters=["experts.gate_up_proj"]).inject(model)
    with pytest.warns(UserWarning, match="own layout"):
        save_adapter(model, tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys[0] == "model.layers.0.mlp.experts.adapter.lora_A"  # as earlier files name it, so they load


def test_the_output_projection_alone_points_to_the_attention_module():
    with pytest.raises(TypeError, match="only LoRA adapts nn.MultiheadAttention, targeted as the attention module"):
        LoRA(target_modules=["attn.out_proj"]).inject(MHAClassifier())


# --- the warning for left-out weights ----------------------------------------------------------------
def caught(inject) -> list[str]:
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        inject()
    return [str(w.message) for w in found if "leaves out" in str(w.message)]


def test_leaving_out_the_experts_is_warned_about_by_name():
    messages = caught(lambda: LoRA(r=R, target_modules=["q_proj", "v_proj"]).inject(mixtral()))
    assert len(messages) == 1
    assert "model.layers.*.mlp.experts.down_proj, model.layers.*.mlp.experts.gate_up_proj" in messages[0]
    assert "gate.weight" not in messages[0]  # the small router beside them is not named
    assert caught(lambda: IA3().inject(mixtral()))


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_no_warning_on_llama(targets):
    assert not caught(lambda: LoRA(r=R, target_modules=targets).inject(llama()))


def test_no_warning_when_all_linear_takes_the_experts():
    assert not caught(lambda: LoRA(r=R).inject(mixtral()))


def test_a_loaded_expert_adapter_is_taken_up_by_the_callback_that_picks_its_weights(tmp_path):
    model = LoRA(r=R).inject(mixtral())  # all-linear: the attention layers and the fused expert weights
    save_adapter(model, tmp_path / "all")
    LoRA(r=R).inject(loaded := load_adapter(mixtral(), tmp_path / "all"))  # was: refused, the file's full names
    assert trainable_summary(loaded).trainable == trainable_summary(model).trainable
    model = LoRA(r=R, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]).inject(mixtral())
    save_adapter(model, tmp_path / "attention")
    with pytest.raises(ValueError, match=r"LoRA\[default\] is in this model already"):  # all-linear adds the experts
        LoRA(r=R).inject(load_adapter(mixtral(), tmp_path / "attention"))
