"""Selective and BitFit through the Trainer: exactly the chosen existing parameters train."""

import pytest
import torch
from torch import nn

from lightning_peft import LoRA, trainable_summary
from lightning_peft.selective import BitFit, Selective

from conftest import (
    VOCAB,
    TokenModule,
    check_resume_reproduces_the_uninterrupted_run,
    make_trainer,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_loader,
)

H, L = 32, 2  # hidden size and blocks of the tiny models
BERT_FFN, LLAMA_FFN, GPT2_FFN = 64, 2 * H, 4 * H
POSITIONS, LABELS = 64, 2
# Every bias of the tiny BERT: per block q, k, v, attention output, its LayerNorm, intermediate, output and
# its LayerNorm; then the embeddings' LayerNorm, the pooler and the classifier.
BERT_BIASES = L * (4 * H + H + BERT_FFN + H + H) + H + H + LABELS
# Tiny GPT-2: per block ln_1, c_attn (3H), attn.c_proj, ln_2, c_fc (4H), mlp.c_proj; then ln_f.
GPT2_BIASES = L * (H + 3 * H + H + H + GPT2_FFN + H) + H


def test_a_complex_parameter_trains():
    class Spectral(nn.Module):
        def __init__(self):
            super().__init__()
            self.filter = nn.Parameter(torch.ones(4, dtype=torch.cfloat))

        def forward(self, x):
            return torch.fft.ifft(torch.fft.fft(x) * self.filter).real

    model = nn.Sequential(nn.Linear(4, 4), Spectral())
    Selective(modules=["1"]).inject(model)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["1.filter"]


def is_bias(name):
    return name.endswith(".bias")


CASES = {
    "bert_bitfit": (tiny_bert, lambda: BitFit(modules_to_save=["classifier"]), BERT_BIASES + H * LABELS,
                    lambda n: is_bias(n) or ".classifier." in n),
    "gpt2_bitfit": (tiny_gpt2, lambda: BitFit(), GPT2_BIASES, is_bias),
    "gpt2_embeddings": (tiny_gpt2, lambda: Selective(param_types=["embedding"]), VOCAB * H + POSITIONS * H,
                        lambda n: n.endswith((".wte.weight", ".wpe.weight"))),
    "llama_norms": (tiny_llama, lambda: Selective(param_types=["norm"]), (2 * L + 1) * H,
                    lambda n: "norm" in n),
    "llama_mlp_of_block_1": (tiny_llama, lambda: Selective(modules=["mlp"], layers=[1]), 3 * H * LLAMA_FFN,
                             lambda n: ".layers.1.mlp." in n),
    "llama_regex_and_kind": (tiny_llama, lambda: Selective(modules=r".*\.layers\.\d+\.(input_layernorm|self_attn)",
                                                           param_types=["norm"]), L * H,
                             lambda n: "input_layernorm" in n),
}


@pytest.mark.parametrize("case", CASES)
def test_training_changes_exactly_the_selected_parameters(case):
    build, method, formula, expected = CASES[case]
    module = TokenModule(build())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    make_trainer([method()], max_steps=3).fit(module, token_loader())

    assert trainable_summary(module).trainable == formula
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    as_base = {n.replace(".adapters.default", ""): n for n in trainable}  # a saved head's copy, by the original's name
    assert set(as_base) == {n for n in before if expected(n)}
    for name, param in module.named_parameters():
        base_name = name.replace(".adapters.default", "").replace(".base_layer", "")
        assert torch.equal(param, before[base_name]) != (name in trainable), name


def test_step_zero_output_equals_base():
    module = TokenModule(tiny_bert()).eval()
    batch = next(iter(token_loader()))[0]
    before = module(batch)
    BitFit(modules_to_save=["classifier"]).inject(module)
    assert torch.equal(module(batch), before)
    assert trainable_summary(module).trainable == BERT_BIASES + H * LABELS



def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    def gpt2():
        torch.manual_seed(0)
        model = tiny_gpt2()
        for dropout in (m for m in model.modules() if isinstance(m, nn.Dropout)):
            dropout.p = 0.0  # no random draws, which a checkpoint does not restore
        return TokenModule(model)

    saved = check_resume_reproduces_the_uninterrupted_run(gpt2, lambda: [BitFit()], tmp_path)
    assert all(is_bias(name) for name in saved)


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_and_bitfit_train_the_union(lora_first):
    module = TokenModule(tiny_bert())
    names = [n for n, _ in module.named_parameters()]
    lora, bitfit = LoRA(r=4, target_modules=["query", "value"]), BitFit(modules_to_save=["classifier"])
    make_trainer([lora, bitfit] if lora_first else [bitfit, lora], max_steps=2).fit(module, token_loader())

    lora_params = L * 2 * 4 * (H + H)
    summary = trainable_summary(module)
    assert {r.method: r.params for r in summary.methods} == {"LoRA[default]": lora_params,
                                                             "BitFit[default]": BERT_BIASES + H * LABELS}
    assert summary.trainable == lora_params + BERT_BIASES + H * LABELS
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    lora_names = {n for n in trainable if ".lora_" in n}
    assert len(lora_names) == L * 2 * 2  # A and B on query and value of each block
    assert {n.replace(".base_layer", "").replace(".adapters.default", "") for n in trainable - lora_names} == {
        n for n in names if is_bias(n) or ".classifier." in n}
    assert "model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable  # seen through the wrapper


@pytest.mark.parametrize("selective, expected, count", [
    (lambda: Selective(modules=r"bert\.encoder\.layer\.\d+\.attention\.self\.query", layers=[0],
                       param_types=["bias"]), {"layer.0.attention.self.query.base_layer.bias"}, H),
    (lambda: Selective(modules=["query"], layers=[1]),  # the LoRA factors inside are not the model's
     {"layer.1.attention.self.query.base_layer.weight", "layer.1.attention.self.query.base_layer.bias"}, H * H + H),
])
def test_selective_matches_names_through_a_lora_wrapper(selective, expected, count):
    model = tiny_bert()
    LoRA(r=4, target_modules=["query"]).inject(model)
    selective().inject(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and ".adapters." not in n}
    assert trained == {"bert.encoder." + n for n in expected}
    rows = {r.method: r.params for r in trainable_summary(model).methods}
    assert rows == {"LoRA[default]": L * 4 * (H + H), "Selective[default]": count}


@pytest.mark.parametrize("first, second", [
    (lambda: Selective(modules=["classifier"], param_types=["bias"]), lambda: BitFit()),
    (lambda: LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"]),
     lambda: BitFit(modules_to_save=["classifier"])),
])
def test_a_parameter_claimed_twice_is_an_error_that_leaves_the_module_as_it_was(first, second):
    module = TokenModule(tiny_bert())
    before = {name: (type(m), id(m)) for name, m in module.named_modules()}
    grads = {name: p.requires_grad for name, p in module.named_parameters()}
    first, second = first(), second()
    with pytest.raises(ValueError) as info:
        make_trainer([first, second], max_steps=1).fit(module, token_loader())
    assert "model.classifier" in str(info.value)
    assert first.owner in str(info.value) and second.owner in str(info.value)
    assert {name: (type(m), id(m)) for name, m in module.named_modules()} == before  # the first is undone too
    assert {name: p.requires_grad for name, p in module.named_parameters()} == grads
    assert trainable_summary(module).methods == []
    make_trainer([first], max_steps=1).fit(module, token_loader())  # the corrected retry, same callback
    assert {r.method for r in trainable_summary(module).methods} == {first.owner}


@pytest.mark.parametrize("method, words", [
    (lambda: BitFit(), ["param_types=['bias'] selects 0", "0 bias", "5 norm", "1 embedding"]),
    (lambda: Selective(modules=["q_porj"]), ["q_porj", "q_proj (Linear)"]),
    (lambda: Selective(modules=["q_proj"], layers=[7]), ["layers=[7] selects 0", "modules=['q_proj'] selects 2",
                                                         "blocks [0, 1]"]),
])
def test_nothing_matching_says_what_exists(method, words):
    model = tiny_llama()
    with pytest.raises(ValueError) as info:
        method().inject(model)
    for word in words:
        assert word in str(info.value)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen


@pytest.mark.parametrize("kwargs", [dict(), dict(param_types=["weights"]), dict(layers=[0], checkpoint="half")])
def test_bad_arguments_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        Selective(**kwargs)


def test_bitfit_trains_the_biases_of_fused_experts_too():
    from architectures import gpt_oss

    model = BitFit().inject(gpt_oss())
    biases = [name for name, _ in model.named_parameters() if name.endswith("bias")]
    assert any(name.endswith("experts.gate_up_proj_bias") for name in biases)
    assert biases and all(param.requires_grad for name, param in model.named_parameters() if name in biases)


def test_selective_trains_an_attention_projection_that_its_module_reads_directly():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16), num_layers=1)
    Selective(modules=["out_proj"]).inject(model)  # was: refused, as if it had to wrap the layer
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "layers.0.self_attn.out_proj.bias", "layers.0.self_attn.out_proj.weight"]


def test_bitfit_beside_another_adapters_head_copy_leaves_the_hidden_original_alone():
    from lightning_peft import IA3

    model = tiny_bert()
    IA3(target_modules=["key", "value"], feedforward_modules=[], modules_to_save=["classifier"]).inject(model)
    BitFit(adapter_name="bf").inject(model)
    assert not model.classifier.base_layer.bias.requires_grad  # was: trained, though the copy runs in its place
    assert model.classifier.adapters["default"].bias.requires_grad


def test_a_bitfit_file_keeps_the_running_statistics_of_the_batchnorm_whose_bias_it_trains(tmp_path):
    from lightning_peft import load_adapter, save_adapter

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))

    model = BitFit().inject(build())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):  # training moves the running statistics
        model(torch.randn(8, 1, 8, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    save_adapter(model.eval(), tmp_path)
    x = torch.randn(2, 1, 8, 8)
    loaded = load_adapter(build().eval(), tmp_path)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)  # was: 0.24 apart, the statistics left out


def test_a_weight_tied_to_a_copied_head_still_runs_and_can_be_selected():
    model = tiny_llama(tie_word_embeddings=True)
    LoRA(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]).inject(model)
    Selective(modules=["embed_tokens"], adapter_name="emb").inject(model)  # was: "selects 0 tensor(s)"
    assert model.model.embed_tokens.weight.requires_grad


@pytest.mark.parametrize("method", [
    lambda: Selective(modules=["model.model.layers.1.mlp"]), lambda: Selective(modules=r"model\.model\.norm"),
    lambda: LoRA(r=2, target_modules=["q_proj"], modules_to_save=["model.lm_head"])],
    ids=["listed", "regex", "modules_to_save"])
def test_an_adapter_named_by_a_lightning_module_s_names_loads_into_the_model_alone(tmp_path, method):
    import copy

    from lightning_peft import load_adapter, save_adapter

    torch.manual_seed(0)
    base = tiny_llama().eval()
    module = TokenModule(copy.deepcopy(base))
    method().inject(module)  # names as the LightningModule has them: "model." before the model's own
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    save_adapter(module, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)  # was: "matched no module", the file unusable
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module.eval()(ids), rtol=0, atol=1e-6)


def test_bitfit_warns_when_only_the_head_has_a_bias():
    import warnings

    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    config = ModernBertConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L,
                              num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              cls_token_id=1, sep_token_id=2)
    with pytest.warns(UserWarning, match=r"BitFit\[default\] selects only classifier.bias, in the output head"):
        BitFit().inject(ModernBertForSequenceClassification(config))  # its blocks have no bias
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BitFit(modules_to_save=["classifier"]).inject(tiny_bert())  # BERT's blocks have biases: quiet
        Selective(modules=["classifier"]).inject(tiny_bert())  # the head by name is what was asked for
