"""Numerical equivalence of our LoRA layers with Hugging Face peft on the same tiny models.

Each test builds one randomly initialised base model, deep-copies it, applies peft's LoRA to one
copy and ours to the other with matching settings, copies the same random non-zero adapter values
into both, and compares the outputs (and, for PiSSA, the initial factors and residual weights).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from torch import nn

from lightning_peft import LoRA, load_adapter, merge, save_adapter, trainable_summary
from lightning_peft.lora import LoRALayer

from conftest import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def tiny_gemma():
    """Gemma multiplies its embedding lookups by sqrt(hidden): a scaled embedding."""
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64))
# Targets given to both libraries; "dense" on BERT hits attention.output, intermediate, output and pooler.
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
}
VARIANTS = {
    "lora": dict(use_rslora=False, use_dora=False),
    "rslora": dict(use_rslora=True, use_dora=False),
    "dora": dict(use_rslora=False, use_dora=True),
}


def _build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_gemma() if kind == "gemma" else BUILDERS[kind]()
    return model.eval()


def _pair(kind, target_modules, r=4, alpha=8, use_rslora=False, use_dora=False, init="default", **peft_extra):
    """(base, peft model, our model) from one base; both adapted copies in eval mode."""
    base = _build(kind)
    peft_init = {"default": True, "pissa": "pissa"}[init]
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0,
                        use_rslora=use_rslora, use_dora=use_dora, init_lora_weights=peft_init, **peft_extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), config).eval()
    ours = LoRA(r=r, alpha=alpha, target_modules=target_modules, use_rslora=use_rslora, use_dora=use_dora,
                init=init).inject(copy.deepcopy(base)).eval()
    return base, theirs, ours


def _peft_key(theirs_params: dict, layer_name: str, what: str, adapter: str = "default") -> str:
    """peft's parameter name for one of our adapter tensors on the layer ``layer_name``."""
    prefix = f"base_model.model.{layer_name}."
    candidates = {
        "lora_A": [f"lora_A.{adapter}.weight", f"lora_embedding_A.{adapter}"],
        "lora_B": [f"lora_B.{adapter}.weight", f"lora_embedding_B.{adapter}"],
        "magnitude": [f"lora_magnitude_vector.{adapter}.weight"],
    }[what]
    found = [prefix + c for c in candidates if prefix + c in theirs_params]
    assert len(found) == 1, f"no peft tensor for {layer_name}.{what}: tried {candidates}"
    return found[0]


def _their_adapter_tensors(theirs: nn.Module) -> set[str]:
    return {n for n, _ in theirs.named_parameters() if ".lora_" in n}


@torch.no_grad()
def _copy_random_adapters(theirs: nn.Module, ours: nn.Module, seed: int = 1, std: float = 0.3) -> int:
    """Give our adapters random non-zero A, B (and perturbed DoRA magnitudes); copy them into peft's."""
    g = torch.Generator().manual_seed(seed)
    their_params = dict(theirs.named_parameters())
    used = set()
    for name, layer in ours.named_modules():
        if not isinstance(layer, LoRALayer):
            continue
        adapter = layer.adapters["default"]
        adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) * std)
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * std)
        tensors = {"lora_A": adapter.lora_A, "lora_B": adapter.lora_B}
        if adapter.magnitude is not None:
            adapter.magnitude.mul_(1 + 0.2 * torch.randn(adapter.magnitude.shape, generator=g))
            tensors["magnitude"] = adapter.magnitude
        for what, value in tensors.items():
            key = _peft_key(their_params, name, what)
            assert their_params[key].shape == value.shape, (key, their_params[key].shape, value.shape)
            their_params[key].copy_(value)
            used.add(key)
    # Every adapter tensor that peft created got a value: the two libraries adapted the same layers.
    assert used == _their_adapter_tensors(theirs)
    return len(used)


def _inputs(kind: str, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _logits(model: nn.Module, kind: str) -> torch.Tensor:
    return model(**_inputs(kind)).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_logits_match_peft(kind, variant):
    base, theirs, ours = _pair(kind, TARGETS[kind], **VARIANTS[variant])
    # Before any change both start as the base model.
    torch.testing.assert_close(_logits(ours, kind), _logits(base, kind), rtol=0, atol=1e-6)
    n = _copy_random_adapters(theirs, ours)
    assert n > 0
    expected, got = _logits(theirs, kind), _logits(ours, kind)
    # The adapters do change the output, so the comparison below is not vacuous.
    assert (got - _logits(base, kind)).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, use_rslora", [("llama", False), ("llama", True), ("gemma", False)])
def test_embedding_lora_matches_peft_and_its_merge(kind, use_rslora):
    base, theirs, ours = _pair(kind, ["embed_tokens", "q_proj"], use_rslora=use_rslora)
    kind = "llama"  # the same inputs
    torch.testing.assert_close(_logits(ours, "llama"), _logits(base, "llama"), rtol=0, atol=1e-6)
    their_params = dict(theirs.named_parameters())
    # peft's embedding shapes are ours: A (r, num_embeddings), B (dim, r).
    ours_adapter = ours.model.embed_tokens.adapters["default"]
    assert tuple(ours_adapter.lora_A.shape) == (4, VOCAB)
    key_a = _peft_key(their_params, "model.embed_tokens", "lora_A")
    key_b = _peft_key(their_params, "model.embed_tokens", "lora_B")
    assert their_params[key_a].shape == ours_adapter.lora_A.shape
    assert their_params[key_b].shape == ours_adapter.lora_B.shape
    _copy_random_adapters(theirs, ours)
    got = _logits(ours, "llama")
    assert (got - _logits(base, "llama")).abs().max() > 1e-2
    torch.testing.assert_close(got, _logits(theirs, "llama"), rtol=0, atol=1e-5)  # Gemma: was 1/8 of the update
    torch.testing.assert_close(_logits(merge(ours), "llama"), got, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_pissa_matches_peft(kind, use_rslora):
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["c_attn", "c_fc"]
    base, theirs, ours = _pair(kind, targets, r=4, alpha=8, use_rslora=use_rslora, init="pissa")
    their_params = dict(theirs.named_parameters())
    layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, LoRALayer)]
    assert len(layers) == 2 * len(targets)
    for name, layer in layers:
        adapter = layer.adapters["default"]
        a = their_params[_peft_key(their_params, name, "lora_A")]
        b = their_params[_peft_key(their_params, name, "lora_B")]
        # Singular vectors may flip sign: compare the product B @ A, which does not.
        torch.testing.assert_close(adapter.lora_B @ adapter.lora_A, b @ a, rtol=0, atol=1e-5)
        # B @ A is not small: PiSSA moved the top-r part of W into the adapter ...
        original = base.get_submodule(name).weight
        assert (adapter.lora_B @ adapter.lora_A).abs().max() > 0.1 * original.abs().max()
        their_residual = their_params[f"base_model.model.{name}.base_layer.weight"]
        torch.testing.assert_close(layer.base_layer.weight, their_residual, rtol=0, atol=1e-5)
        # ... and out of the base weight, which is now the residual.
        assert (layer.base_layer.weight - original).abs().max() > 0.1 * original.abs().max()
        torch.testing.assert_close(layer.base_layer.weight + layer.to_weight_layout(adapter.update()), original,
                                   rtol=0, atol=1e-5)
    # Residual + adapter is the original model, in both libraries.
    torch.testing.assert_close(_logits(ours, kind), _logits(theirs, kind), rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(ours, kind), _logits(base, kind), rtol=0, atol=1e-4)


def test_a_trained_pissa_adapter_loads_onto_the_original_base_here_and_in_peft(tmp_path):
    base = _build("llama")
    ours = LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="pissa").inject(copy.deepcopy(base)).eval()
    with torch.no_grad():  # trained: A and B move away from W's top-r part, which the base no longer holds
        for param in ours.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    expected = _logits(ours, "llama")
    torch.testing.assert_close(_logits(load_adapter(copy.deepcopy(base), tmp_path).eval(), "llama"), expected,
                               rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs, "llama"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, settings", [("llama", {}), ("llama", {"use_rslora": True}),
                                             ("llama", {"use_dora": True}), ("gpt2", {})])
def test_a_pissa_adapter_saved_for_the_original_base_is_a_plain_lora_of_twice_the_rank(tmp_path, kind, settings):
    base = _build(kind)
    targets = ["q_proj", "v_proj"] if kind == "llama" else ["c_attn"]
    ours = LoRA(r=4, alpha=8, target_modules=targets, init="pissa", **settings).inject(copy.deepcopy(base)).eval()
    with torch.no_grad():  # trained
        for param in ours.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    save_adapter(ours, tmp_path, for_original_base=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    expected = _logits(ours, kind)
    assert (expected - _logits(base, kind)).abs().max() > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()  # no SVD: plain LoRA on W
    torch.testing.assert_close(_logits(theirs, kind), expected, rtol=0, atol=1e-5)
    mine = load_adapter(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(_logits(mine, kind), expected, rtol=0, atol=1e-5)
    assert not any(torch.equal(layer.base_layer.weight, ours.get_submodule(name).base_layer.weight)
                   for name, layer in mine.named_modules() if isinstance(layer, LoRALayer))  # W, not the residual


def test_saving_a_plain_adapter_for_the_original_base_writes_it_as_it_is(tmp_path):
    model = LoRA(r=4, target_modules=["q_proj"]).inject(_build("llama"))
    save_adapter(model, tmp_path / "as_is")
    save_adapter(model, tmp_path / "original", for_original_base=True)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "as_is" / file).read_bytes() == (tmp_path / "original" / file).read_bytes()


@pytest.mark.parametrize("init", ["olora", "OLoRA", "corda", "loftq", "lora_ga", "pissa_niter_4", "a_new_init"])
def test_a_peft_file_whose_init_rewrote_the_base_is_refused(tmp_path, init):  # OLoRA: peft reads any case (was:
    base = _build("llama")  # loaded as plain LoRA); an init not known here may rewrite it too
    LoRA(r=4, target_modules=["q_proj"]).inject(model := copy.deepcopy(base))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' changed the base weights .*"
                                         "path_initial_model_for_weight_conversion"):
        load_adapter(copy.deepcopy(base), tmp_path)


COUNT_CASES = [
    ("llama", ["q_proj", "v_proj"], {}),
    ("llama", "all-linear", {}),
    ("llama", "all-linear", {"use_dora": True}),
    ("llama", ["embed_tokens"], {}),
    ("llama", ["embed_tokens", "down_proj"], {"r": 2}),
    ("llama", r".*layers\.1\.self_attn\.[qk]_proj", {}),
    ("llama", ["q_proj", "k_proj", "o_proj"], {"use_dora": True, "r": 8}),
    ("gpt2", "all-linear", {}),
    ("gpt2", ["c_attn"], {"use_dora": True}),
    ("bert", ["query", "value"], {}),
]


@pytest.mark.parametrize(("kind", "targets", "extra"), COUNT_CASES)
def test_trainable_count_matches_peft(kind, targets, extra):
    _, theirs, ours = _pair(kind, targets, **extra)
    their_trainable, their_total = theirs.get_nb_trainable_parameters()
    summary = trainable_summary(ours)
    assert summary.trainable == their_trainable
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == their_trainable
    assert summary.total == their_total
    # The adapter is the only trainable thing and is owned by LoRA[default].
    assert [(row.method, row.params) for row in summary.methods] == [("LoRA[default]", their_trainable)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_all_linear_selects_the_same_layers_as_peft(kind):
    _, theirs, ours = _pair(kind, "all-linear")
    prefix = "base_model.model."
    their_layers = {n[len(prefix):].rsplit(".lora_A", 1)[0] for n in _their_adapter_tensors(theirs) if ".lora_A." in n}
    our_layers = {n for n, m in ours.named_modules() if isinstance(m, LoRALayer)}
    assert our_layers == their_layers
    assert "lm_head" not in our_layers
    assert len(our_layers) == (14 if kind == "llama" else 8)


def test_all_linear_with_classifier_saved_matches_peft_seq_cls():
    """peft's SEQ_CLS task keeps the classifier out of "all-linear" and trains it whole: so do we."""
    base = _build("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                                target_modules="all-linear"))
    ours = LoRA(r=4, alpha=8, target_modules="all-linear", modules_to_save=["classifier"]).inject(copy.deepcopy(base))
    their_trainable, _ = theirs.get_nb_trainable_parameters()
    assert trainable_summary(ours).trainable == their_trainable
    assert not isinstance(ours.classifier, LoRALayer)
    assert all(p.requires_grad for p in ours.classifier.adapters["default"].parameters())


def test_the_embedding_peft_saves_beside_an_adapter_loads_and_hot_swaps_as_in_peft(tmp_path):
    from lightning_peft import hotswap_adapter

    def resized(seed):  # the same base, its vocabulary resized in another process: other random new rows
        torch.manual_seed(0)
        model = tiny_llama(tie_word_embeddings=True)
        torch.manual_seed(seed)
        model.resize_token_embeddings(VOCAB + 8, mean_resizing=False)
        return model.eval()

    targets = ["embed_tokens", "q_proj"]
    peft_model = get_peft_model(resized(1), LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.1)
    peft_model.save_pretrained(tmp_path)  # with the embedding's weight (save_embedding_layers="auto")
    x = torch.tensor([[VOCAB + 1, 5, VOCAB + 3, 7, VOCAB + 7]])
    expected = peft_model(x).logits
    differ = r"holds the base weights of model.embed_tokens .* differ from this model's"
    with pytest.warns(UserWarning, match=differ):
        loaded = load_adapter(resized(2), tmp_path)
    assert torch.allclose(loaded(x).logits, expected, atol=1e-5)
    slot = LoRA(r=4, alpha=8, target_modules=targets).inject(resized(3))
    state = {k: v.clone() for k, v in slot.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning as an error: nothing swapped (was: the adapter, not the base)
        with pytest.raises(UserWarning, match=differ):
            hotswap_adapter(slot, tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in slot.state_dict().items())
    with pytest.warns(UserWarning, match=differ):
        swapped = hotswap_adapter(slot, tmp_path)
    assert torch.allclose(swapped(x).logits, expected, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(resized(1), tmp_path)  # the base it trained on: nothing changes, quietly
    other = tiny_llama(tie_word_embeddings=True)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=rf"embed_tokens.base_layer.weight' of shape \({VOCAB + 8}, 32\), and this "
                                         rf"model's is \({VOCAB}, 32\): resize the model's token embeddings to "
                                         f"{VOCAB + 8} first"):
        load_adapter(other, tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())


def test_the_resized_embeddings_peft_saves_beside_an_adapter_of_other_layers_load_as_in_peft(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")  # peft compares the vocabulary with the base's config

    def resized(seed):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        torch.manual_seed(seed)
        model.resize_token_embeddings(VOCAB + 8, mean_resizing=False)
        return model.eval()

    peft_model = get_peft_model(resized(1), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).eval()
    peft_model.save_pretrained(tmp_path / "adapter")  # with model.embed_tokens.weight and lm_head.weight
    x = torch.tensor([[VOCAB + 1, 5, VOCAB + 3, 7, VOCAB + 7]])
    with pytest.warns(UserWarning, match=r"holds the base weights of (model.embed_tokens, lm_head|lm_head, "
                                         r"model.embed_tokens) .* differ"):
        loaded = load_adapter(resized(2), tmp_path / "adapter")  # was: "saved for another model or settings"
    assert torch.allclose(loaded(x).logits, peft_model(x).logits, atol=1e-5)


@pytest.mark.parametrize("saved", [["lm_head"], ["head"]])  # peft matches a plain suffix: "head" is lm_head
def test_a_hot_swapped_file_s_own_head_copy_is_not_taken_for_a_base_weight(tmp_path, saved):
    from lightning_peft import hotswap_adapter

    torch.manual_seed(0)
    base = tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"],
                                                                modules_to_save=saved))
    peft_model.save_pretrained(tmp_path)  # base_model.model.lm_head.weight: the adapter's own copy of the head
    slot = LoRA(r=4, target_modules=["q_proj"]).inject(copy.deepcopy(base))  # no head of its own
    head = slot.lm_head.weight.clone()
    with pytest.raises(ValueError, match="holds tensor 'base_model.model.lm_head.weight' .* must adapt the same"):
        hotswap_adapter(slot, tmp_path)  # was: copied into the base head, which every adapter shares
    assert torch.equal(slot.lm_head.weight, head)
