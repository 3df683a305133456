"""Soft prompts: prompt tuning and prefix tuning through the Trainer, against peft, in generation.

peft 0.21.2 computes the same forward as ours on transformers 5.24, so logits are compared
directly. Its ``generate`` is broken there for both methods (it looks for ``past_key_values``,
which transformers 5 renamed ``cache``: prompt tuning prepends the prompt again at every
decoding step, prefix tuning drops the prefix), so generation is checked against greedy
decoding through peft's forward instead, plus peft's first generated token.
"""

import copy
import json
import warnings

import pytest
import torch
from architectures import mixtral
from torch import nn

from lightning_peft import (
    LoRA,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge,
    save_adapter,
    set_adapter,
    trainable_summary,
)
from lightning_peft.additive import PrefixTuning, PromptTuning

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

N = 4  # virtual tokens
H = 32  # hidden size of the tiny models
LAYERS = 2
KV = {"llama": 16, "gpt2": 32}  # key/value width per layer: tiny Llama has 2 KV heads of 8 (GQA)
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BUILDERS[kind]()


def prompt_case(kind):
    return kind, PromptTuning(num_virtual_tokens=N), N * H


def prefix_case(kind, **kwargs):
    width = LAYERS * 2 * KV[kind]
    if not kwargs.get("projection", True):
        return kind, PrefixTuning(num_virtual_tokens=N, **kwargs), N * width
    p = kwargs.get("projection_dim") or H
    return kind, PrefixTuning(num_virtual_tokens=N, **kwargs), N * H + (H * p + p) + (p * width + width)


CASES = {
    "prompt-llama": lambda: prompt_case("llama"),
    "prompt-gpt2": lambda: prompt_case("gpt2"),
    "prompt-bert": lambda: prompt_case("bert"),
    "prompt-bert-head": lambda: ("bert", PromptTuning(N, modules_to_save=["classifier"]), N * H + H * 2 + 2),
    "prefix-llama": lambda: prefix_case("llama", projection=False),
    "prefix-gpt2": lambda: prefix_case("gpt2", projection=False),
    "prefix-llama-projection": lambda: prefix_case("llama"),
    "prefix-gpt2-projection-8": lambda: prefix_case("gpt2", projection_dim=8),
}


def batch(seed: int = 2, length: int = 7, padded: bool = True, side: str = "left") -> dict:
    """Two rows of random ids, the first padded by two on ``side``.

    Prompt tuning is compared with peft on right-padded rows: peft puts the prompt before a row's
    left padding and numbers its tokens past that padding, so its left-padded rows compute
    otherwise than alone; ours number them as ``generate`` does.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, slice(0, 2) if side == "left" else slice(-2, None)] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("case", CASES)
def test_training_changes_only_the_method_parameters(case):
    kind, method, formula = CASES[case]()
    module = method.inject(TokenModule(build(kind)))  # injected now to record the initial prompt; setup skips it
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    make_trainer([method], max_steps=3).fit(module, token_loader())

    summary = trainable_summary(module)
    assert summary.trainable == formula
    assert [(row.method, row.params) for row in summary.methods] == [(method.owner, formula)]
    for name, param in module.named_parameters():
        if name in before and not param.requires_grad:
            assert torch.equal(param, before[name]), f"base weight {name} changed"
        else:
            assert param.requires_grad and not torch.equal(param, before[name]), f"{name} did not train"
    module.eval()
    ids = batch()["input_ids"]
    expected = (2, 7, VOCAB) if kind != "bert" else (2, 2)
    assert module(ids).shape == expected  # the virtual positions are cut off the logits


@pytest.mark.parametrize("case", ["prompt-llama", "prefix-llama-projection"])
def test_resume_reproduces_the_uninterrupted_run(case, tmp_path):
    kind = CASES[case]()[0]
    check_resume_reproduces_the_uninterrupted_run(lambda: TokenModule(build(kind)), lambda: [CASES[case]()[1]],
                                                  tmp_path)


def peft_pair(kind: str, method):
    """(peft model, our model) from one base, holding the same prompt or prefix values, in eval mode."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    base = build(kind).eval()
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    prompt = isinstance(method, PromptTuning)
    config = (PromptTuningConfig if prompt else PrefixTuningConfig)(task_type=task, num_virtual_tokens=N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), config).eval()
    ours = method.inject(copy.deepcopy(base)).eval()
    values = ours.prompt_tuning.adapters["default"].prompt if prompt else ours.prefix_tuning.adapters["default"].prefix
    with torch.no_grad():
        values.normal_(generator=torch.Generator().manual_seed(1))  # not the init, so nothing matches by chance
        their_values = theirs.prompt_encoder["default"].embedding.weight
        assert their_values.shape == values.shape
        their_values.copy_(values)
    return theirs, ours


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_prompt_tuning_logits_equal_peft(kind):
    theirs, ours = peft_pair(kind, PromptTuning(num_virtual_tokens=N))
    inputs = batch(side="right")
    with torch.no_grad():
        got, expected = ours(**inputs).logits, theirs(**inputs).logits
    if kind != "bert":  # peft returns the virtual positions too; ours cuts them off
        expected = expected[:, N:]
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_prompt_tuning_loss_and_token_inputs_equal_peft():
    """Labels get -100 on the virtual positions; token type ids 0; default position ids stay default."""
    theirs, ours = peft_pair("llama", PromptTuning(num_virtual_tokens=N))
    inputs = batch(side="right")
    with torch.no_grad():
        got, expected = ours(**inputs, labels=inputs["input_ids"]), theirs(**inputs, labels=inputs["input_ids"])
    assert torch.allclose(got.loss, expected.loss, atol=1e-6)

    theirs, ours = peft_pair("bert", PromptTuning(num_virtual_tokens=N))
    token_types = torch.ones_like(inputs["input_ids"])
    positions = torch.arange(7).expand(2, 7)
    labels = torch.tensor([0, 1])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        expected = theirs(**inputs, token_type_ids=token_types, labels=labels)
        got = ours(**inputs, token_type_ids=token_types, position_ids=positions, labels=labels)
    assert torch.allclose(got.logits, expected.logits, atol=1e-5)
    assert torch.allclose(got.loss, expected.loss, atol=1e-6)


def test_hidden_states_and_positional_calls_keep_the_input_shape():
    model = PromptTuning(num_virtual_tokens=N).inject(build("llama")).eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)  # input_ids passed positionally
        out_tuple = model(ids, return_dict=False)
    assert out.logits.shape == (2, 7, VOCAB)
    assert all(h.shape == (2, 7, H) for h in out.hidden_states)
    assert torch.allclose(out_tuple[0], out.logits)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prefix_tuning_logits_equal_peft(kind):
    theirs, ours = peft_pair(kind, PrefixTuning(num_virtual_tokens=N, projection=False))
    inputs = batch()
    with torch.no_grad():
        got, expected = ours(**inputs).logits, theirs(**inputs).logits
        base = build(kind).eval()(**inputs).logits
    assert got.shape == expected.shape == (2, 7, VOCAB)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # the prefix does change the output


def greedy(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence through ``model`` at every step."""
    for _ in range(steps):
        next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generate_equals_greedy_decoding_through_peft(method):
    adapter = PromptTuning(num_virtual_tokens=N) if method == "prompt" else PrefixTuning(N, projection=False)
    theirs, ours = peft_pair("llama", adapter)
    ours.generation_config.eos_token_id = None  # tiny random models emit "eos" early; decode all 5 steps
    ids = batch(padded=False)["input_ids"]
    with torch.no_grad():
        expected = greedy(theirs, ids, 5)
        cached = ours.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        uncached = ours.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=False)
        their_first = theirs.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)
    if method == "prompt":  # peft's own generate gets the first step (the only one it runs correctly) right
        assert torch.equal(their_first, expected[:, :8])


@pytest.mark.parametrize("new_architecture, kv_heads", [(False, 1), (True, 4)])  # the newer broadcasts to all
def test_prefix_tuning_on_falcon_counts_its_key_value_heads(new_architecture, kv_heads):
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                          multi_query=True, new_decoder_architecture=new_architecture, num_kv_heads=2)
    base = FalconForCausalLM(config).eval()
    model = PrefixTuning(num_virtual_tokens=N, projection=False).inject(copy.deepcopy(base))
    prefix = model.prefix_tuning.adapters["default"].prefix
    assert prefix.shape == (N, LAYERS * 2 * kv_heads * H // 4)  # falcon-7b's multi-query: one key/value head
    with torch.no_grad():
        prefix.normal_(generator=torch.Generator().manual_seed(1))
        ids = batch(padded=False)["input_ids"]
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)
        model.generation_config.eos_token_id = None
        generated = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(generated, greedy(model, ids, 3))  # the cache holds the prefix as the layers read it


def test_a_prompt_and_a_prefix_together_compute_both_or_refuse_where_the_prompt_would_be_skipped():
    def randomized(model):
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_()
        return model

    inputs = batch(padded=False)
    model = randomized(PrefixTuning(N, projection=False, adapter_name="x").inject(
        PromptTuning(N, adapter_name="p").inject(build("llama"))))
    prefix_only = copy.deepcopy(model)
    delete_adapter(prefix_only, "p")
    prompt = model.prompt_tuning.adapters["p"].prompt
    by_hand = torch.cat([prompt.expand(2, -1, -1), model.get_input_embeddings()(inputs["input_ids"])], 1)
    with torch.no_grad():
        expected = prefix_only(inputs_embeds=by_hand, attention_mask=torch.ones(2, N + 7, dtype=torch.long)).logits
        torch.testing.assert_close(model(**inputs).logits, expected[:, N:])
    model = randomized(PromptTuning(N, adapter_name="p").inject(
        PrefixTuning(N, projection=False, adapter_name="x").inject(build("llama"))))
    with pytest.raises(ValueError, match="PromptTuning and PrefixTuning adapters are active together, and the "
                                         "prefix went in first, so the prompt would be skipped"):
        model(**inputs)
    set_adapter(model, "x")
    model(**inputs)  # one at a time: fine


def test_prompt_tuning_refuses_a_model_whose_forward_takes_no_embeddings():
    from transformers import SiglipConfig, SiglipModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = SiglipModel(SiglipConfig(text_config=dict(tower, vocab_size=64, max_position_embeddings=16),
                                     vision_config=dict(tower, image_size=16, patch_size=8)))  # input_ids first
    with pytest.raises(TypeError, match="SiglipModel.forward takes no inputs_embeds"):  # was: injected, then
        PromptTuning(num_virtual_tokens=4).inject(model)  # failed inside the text tower at the first forward
    assert not any(p.requires_grad is False for p in model.parameters())  # left as it was: nothing frozen
    llama = build("llama")

    class PassesItsArgumentsOn(type(llama)):  # a user's subclass: its own forward takes **kwargs
        def forward(self, input_ids=None, **kwargs):
            return super().forward(input_ids=input_ids, **kwargs)

    class Narrow(type(llama)):  # its own forward names its arguments: inputs_embeds would not reach the model
        def forward(self, input_ids=None, attention_mask=None, labels=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    llama.__class__ = Narrow
    with pytest.raises(TypeError, match="Narrow.forward takes no inputs_embeds"):
        PromptTuning(num_virtual_tokens=4).inject(llama)
    llama.__class__ = PassesItsArgumentsOn
    PromptTuning(num_virtual_tokens=4).inject(llama)  # the class it derives from takes inputs_embeds
    assert llama(torch.randint(0, 64, (2, 5))).logits.shape[:2] == (2, 5)  # was: refused


@pytest.mark.parametrize("method", [PromptTuning(num_virtual_tokens=N), PrefixTuning(num_virtual_tokens=N)])
def test_merge_refuses_soft_prompts(method):
    model = method.inject(build("llama"))
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=f"{type(method).__name__} adapters cannot be merged"):
        merge(model)
    assert set(model.state_dict()) == keys


def test_lora_and_prompt_tuning_train_the_union():
    module = TokenModule(build("llama"))
    lora = LoRA(r=4, alpha=8, target_modules=["q_proj", "embed_tokens"])  # the prompt meets a wrapped embedding
    prompt = PromptTuning(num_virtual_tokens=N)
    prompt.inject(lora.inject(module))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    make_trainer([lora, prompt], max_steps=3).fit(module, token_loader())
    rows = {row.method: row.params for row in trainable_summary(module).methods}
    assert rows == {"LoRA[default]": LAYERS * 4 * (H + H) + 4 * (VOCAB + H), "PromptTuning[default]": N * H}
    assert trainable_summary(module).trainable == sum(rows.values())
    trained = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert "model.prompt_tuning.adapters.default.prompt" in trained
    assert any("lora_B" in n for n in trained)
    assert all(module.get_parameter(n).requires_grad for n in trained)


def test_fold_keeps_the_outputs_and_leaves_a_plain_prefix():
    method = PrefixTuning(num_virtual_tokens=N, projection_dim=8)
    model = method.inject(build("gpt2")).eval()
    inputs = batch()
    with torch.no_grad():
        before = model(**inputs).logits
    method.fold(model)
    assert trainable_summary(model).trainable == N * LAYERS * 2 * KV["gpt2"]
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, before, atol=1e-6)

    plain = PrefixTuning(num_virtual_tokens=N, projection=False).inject(build("gpt2")).eval()
    adapter = {k: v for k, v in model.state_dict().items() if "prefix_tuning" in k}
    assert list(adapter) == ["prefix_tuning.adapters.default.prefix"]
    plain.load_state_dict(adapter, strict=False)
    with torch.no_grad():
        assert torch.allclose(plain(**inputs).logits, before, atol=1e-6)


class FakeTokenizer:
    """Splits on spaces and numbers words by a fixed list: enough to tokenize an init text."""

    words = ["classify", "the", "review"]

    def __call__(self, text: str) -> dict:
        return {"input_ids": [self.words.index(w) + 10 for w in text.split()]}


def test_prompt_initialisations():
    model = build("llama")
    table = model.get_input_embeddings().weight.detach().clone()

    vocab = PromptTuning(num_virtual_tokens=N, init="vocab").inject(copy.deepcopy(model))
    prompt = vocab.prompt_tuning.adapters["default"].prompt
    assert all(any(torch.equal(row, entry) for entry in table) for row in prompt)

    text = PromptTuning(num_virtual_tokens=5, init_text="classify the review", tokenizer=FakeTokenizer())
    prompt = text.inject(copy.deepcopy(model)).prompt_tuning.adapters["default"].prompt
    assert torch.equal(prompt, table[[10, 11, 12, 10, 11]])  # the text repeated to length

    module = TokenModule(copy.deepcopy(model))
    module.tokenizer = FakeTokenizer()  # the module's tokenizer is taken when none is passed
    PromptTuning(num_virtual_tokens=2, init_text="the review").inject(module)
    assert torch.equal(module.model.prompt_tuning.adapters["default"].prompt, table[[11, 12]])

    random = PromptTuning(num_virtual_tokens=200).inject(copy.deepcopy(model)).prompt_tuning.adapters["default"]
    random = random.prompt
    assert abs(random.std().item() - table.std().item()) < 0.1 * table.std().item()


def test_errors_are_clear():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PromptTuning(init_text="classify the review").inject(build("llama"))
    with pytest.raises(ValueError, match="init='text' needs init_text"):
        PromptTuning(init="text")
    with pytest.raises(ValueError, match="init_text is read only with init='text', not 'vocab'"):
        PromptTuning(init="vocab", init_text="Classify:")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        PromptTuning().inject(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="takes none. Use PromptTuning"):
        PrefixTuning().inject(build("bert"))
    for bad in (dict(num_virtual_tokens=0), dict(projection_dim=-1), dict(projection=False, projection_dim=8)):
        with pytest.raises(ValueError):
            PrefixTuning(**bad)
    model = PrefixTuning(num_virtual_tokens=N).inject(build("llama")).train()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()  # renamed in v5
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**batch())
    one_row = torch.randint(1, VOCAB, (1, 5))
    for method in (PromptTuning(N), PrefixTuning(N)):
        model = method.inject(build("llama")).eval()
        for inputs in (batch(), dict(input_ids=one_row, attention_mask=torch.ones_like(one_row))):  # padded, not
            with pytest.raises(ValueError, match="a cache that grows, and generate was given a static one .*: leave "
                                                 "cache_implementation unset"):  # was: IndexError from one row
                model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("method", [PromptTuning, PrefixTuning])
def test_named_adapters_switch_disable_and_delete(method):
    """Two adapters in front one after the other; set_adapter, disable_adapters and delete_adapter act on them."""
    part = "prompt_tuning" if method is PromptTuning else "prefix_tuning"
    base = build("llama").eval()
    model = method(num_virtual_tokens=N, adapter_name="a").inject(copy.deepcopy(base))
    method(num_virtual_tokens=2, adapter_name="b").inject(model)
    b_alone = method(num_virtual_tokens=2, adapter_name="b").inject(copy.deepcopy(base))
    getattr(b_alone, part).load_state_dict(getattr(model, part).state_dict(), strict=False)
    inputs = batch()
    with torch.no_grad():
        base_logits, both = base(**inputs).logits, model(**inputs).logits
        with disable_adapters(model):
            assert torch.equal(model(**inputs).logits, base_logits)
        set_adapter(model, "b")
        only_b = model(**inputs).logits
        assert torch.allclose(only_b, b_alone(**inputs).logits, atol=1e-6)
        assert not torch.allclose(only_b, both, atol=1e-4)
        delete_adapter(model, "a")
        assert hasattr(model, part)  # "b" still uses it
        delete_adapter(model, "b")
        assert torch.equal(model(**inputs).logits, base_logits)
    assert trainable_summary(model).trainable == 0
    assert not hasattr(model, part) and not model._forward_hooks and not model._forward_pre_hooks
    merge(model)  # nothing unmergeable is left behind


SAVE_CASES = {
    "prompt-llama": ("llama", lambda: PromptTuning(num_virtual_tokens=N)),
    "prompt-bert-head": ("bert", lambda: PromptTuning(num_virtual_tokens=N, modules_to_save=["classifier"])),
    "prefix-llama": ("llama", lambda: PrefixTuning(num_virtual_tokens=N, projection=False)),
    "prefix-gpt2-projection": ("gpt2", lambda: PrefixTuning(num_virtual_tokens=N, projection_dim=8)),
}


def their_logits(theirs, kind: str) -> torch.Tensor:
    with torch.no_grad():
        logits = theirs.eval()(**batch(side="right")).logits
    return logits if kind == "bert" or logits.shape[1] == 7 else logits[:, N:]


@pytest.mark.parametrize("case", SAVE_CASES)
def test_saved_adapter_loads_in_peft(case, tmp_path):
    from peft import PeftModel

    kind, make = SAVE_CASES[case]
    base = build(kind).eval()
    method = make()
    ours = method.inject(copy.deepcopy(base)).eval()
    with torch.no_grad():
        for param in ours.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    names = [name for name, _ in ours.named_parameters()]
    save_adapter(ours, tmp_path)  # a prefix MLP is saved as the prefix it computes, as peft saves it
    assert [name for name, _ in ours.named_parameters()] == names  # the model is left as it was
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        expected = ours(**batch(side="right")).logits
    assert torch.allclose(their_logits(theirs, kind), expected, atol=1e-5)


@pytest.mark.parametrize("case", ["prompt-llama", "prompt-bert", "prefix-llama-projection"])
def test_peft_saved_adapter_loads_into_ours(case, tmp_path):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    kind = case.split("-")[1]
    config = (PromptTuningConfig if case.startswith("prompt") else PrefixTuningConfig)(
        task_type="SEQ_CLS" if kind == "bert" else "CAUSAL_LM", num_virtual_tokens=N)
    base = build(kind).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for param in theirs.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.5)
        theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        got = ours(**batch(side="right")).logits
    assert torch.allclose(got, their_logits(theirs, kind), atol=1e-5)


def test_an_encoder_decoders_decoder_side_gets_no_prompt_whatever_its_length():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=4, d_ff=64, num_layers=1, num_heads=8,  # 3 + 5 heads
                      decoder_start_token_id=0, pad_token_id=0, attn_implementation="eager")
    model = PromptTuning(num_virtual_tokens=3).inject(T5ForConditionalGeneration(config)).eval()
    prompt = model.prompt_tuning.adapters["default"].prompt
    ids, mask = torch.randint(1, VOCAB, (2, 5)), torch.ones(2, 5, dtype=torch.long)

    def by_hand(attention=mask, **decoder):  # the prompt before the encoder's input, the decoder's untouched
        with disable_adapters(model):
            embeds = torch.cat([prompt.expand(2, -1, -1), model.get_input_embeddings()(ids)], 1)
            return model(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones_like(mask[:, :3]), attention], 1),
                         **decoder)

    with torch.no_grad():
        for decoder in ({"labels": torch.randint(1, VOCAB, (2, 5))},  # as long as the encoder's input
                        {"decoder_input_ids": torch.randint(1, VOCAB, (2, 8))}):  # as long as prompt + input
            ours = model(input_ids=ids, attention_mask=mask, output_attentions=True, **decoder)
            expected = by_hand(output_attentions=True, **decoder)
            assert ours.encoder_attentions[0].shape[1] == 8  # heads: attention maps keep every position
            torch.testing.assert_close(ours.logits, expected.logits)
            if "labels" in decoder:
                torch.testing.assert_close(ours.loss, expected.loss)
            torch.testing.assert_close(ours.encoder_last_hidden_state, expected.encoder_last_hidden_state[:, 3:])
        with pytest.raises(ValueError, match="encoder_outputs were computed without it .generate runs the encoder"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
        as_tuple = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids, return_dict=False)
        torch.testing.assert_close(as_tuple[-1], by_hand(decoder_input_ids=ids).encoder_last_hidden_state[:, 3:])
        padded = mask.clone()
        padded[1, 3:] = 0
        decoder_ids, cache, steps = torch.randint(1, VOCAB, (2, 4)), None, []  # step by step, with the decoder's cache
        for i in range(4):
            out = model(input_ids=ids, attention_mask=padded, decoder_input_ids=decoder_ids[:, i:i + 1], cache=cache,
                        use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), by_hand(padded, decoder_input_ids=decoder_ids).logits)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_decoder_classifier_pools_the_last_real_token_of_a_padded_row(kind, side):
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=0))
    else:  # learned absolute positions
        model = GPT2ForSequenceClassification(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                         num_labels=3, pad_token_id=0))
    PromptTuning(num_virtual_tokens=3).inject(model.eval())
    ids = torch.randint(1, VOCAB, (1, 5))
    padding = torch.zeros(1, 3, dtype=torch.long)
    padded, mask = [torch.cat(pair[::-1] if side == "left" else pair, 1) for pair in
                    ((ids, padding), (torch.ones_like(ids), padding))]  # left: the padding between prompt and row
    alone = model(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits, alone, rtol=0, atol=1e-5)
    alone.sum().backward()
    assert model.prompt_tuning.adapters["default"].prompt.grad.abs().sum() > 0  # the prompt trains


def tiny_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=2 * H,
                                                          num_hidden_layers=1, num_attention_heads=4,
                                                          max_position_embeddings=64))


@pytest.mark.parametrize("model, method, table", [
    (tiny_bert, PromptTuning, 64), (tiny_roberta, PromptTuning, 62),  # RoBERTa numbers from its padding index + 1
    (tiny_gpt2, PromptTuning, 64), (tiny_gpt2, PrefixTuning, 64)])
def test_inputs_that_would_overrun_a_learned_position_table_are_refused_naming_the_length_that_fits(model, method,
                                                                                                    table):
    module = TokenModule(model())
    method(num_virtual_tokens=N).inject(module)
    module.model(input_ids=torch.randint(3, VOCAB, (2, table - N)))  # the longest input that fits runs
    with pytest.raises(ValueError, match=f"{N} virtual tokens \\+ {table - N + 1} tokens .* has {table} learned "
                                         f"positions: keep inputs to at most {table - N} tokens"):
        module.model(input_ids=torch.randint(3, VOCAB, (2, table - N + 1)))  # was: an index or size error deep inside


def test_a_rotary_model_takes_inputs_beyond_its_max_position_embeddings_with_a_prompt():
    module = TokenModule(build("llama"))
    PromptTuning(num_virtual_tokens=N).inject(module)
    assert module.model(input_ids=torch.randint(3, VOCAB, (1, 70))).logits.shape[1] == 70  # 64 positions configured


def test_a_fit_whose_data_could_overrun_the_position_table_stops_before_any_step_and_leaves_the_model_as_it_was():
    import lightning as L

    class Data(L.LightningDataModule):
        max_length = 62  # 62 + 4 virtual tokens > tiny BERT's 64 positions, though this loader's rows are short

        def train_dataloader(self):
            return token_loader()

    module = TokenModule(build("bert"))
    with pytest.raises(ValueError, match="keep inputs to at most 60 tokens"):
        make_trainer([PromptTuning(num_virtual_tokens=N)]).fit(module, datamodule=Data())
    assert not hasattr(module.model, "prompt_tuning") and all(p.requires_grad for p in module.parameters())
    Data.max_length = 60
    make_trainer([PromptTuning(num_virtual_tokens=N)], max_steps=1).fit(module, datamodule=Data())


@pytest.mark.parametrize("method", [PromptTuning, PrefixTuning])
def test_a_soft_prompt_says_which_of_two_models_it_goes_into(method):
    class TeacherAndStudent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.teacher, self.student = build("llama"), build("llama")

    module = TeacherAndStudent()
    with pytest.warns(UserWarning, match=r"holds 2 transformers models \(teacher, student\); the adapter goes into "
                                         r"the first, 'teacher'"):
        method(num_virtual_tokens=N).inject(module)  # was: silently the teacher's
    method(num_virtual_tokens=N).inject(module.student)
    assert any(p.requires_grad for p in module.student.parameters())


def test_a_prompt_on_a_state_space_model_saves_and_loads_and_a_prefix_is_refused(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    base = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4,
                                        expand=2, conv_kernel=4)).eval()
    model = PromptTuning(num_virtual_tokens=N).inject(copy.deepcopy(base))
    with torch.no_grad():
        model.prompt_tuning.adapters["default"].prompt.normal_()
    ids = torch.randint(0, VOCAB, (2, 6))
    with pytest.warns(UserWarning, match="MambaForCausalLM has no attention heads .a state-space model., and peft"):
        save_adapter(model, tmp_path)  # was: a peft layout that peft refuses (num_attention_heads None)
    assert "num_attention_heads" not in json.loads((tmp_path / "adapter_config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(copy.deepcopy(base), tmp_path)(ids).logits, model(ids).logits)
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # was: a cache ValueError
        by_forward = [model(input_ids=out.sequences[:, :6 + i]).logits[:, -1] for i in range(3)]
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(by_forward))  # the state holds the prompt
        assert (by_forward[-1] - base(input_ids=out.sequences[:, :8]).logits[:, -1]).abs().max() > 1e-5  # it acts
    keys = set(base.state_dict())
    with pytest.raises(TypeError, match="MambaForCausalLM has no attention heads"):
        PrefixTuning(num_virtual_tokens=N).inject(base)
    assert set(base.state_dict()) == keys


def tiny(kind: str) -> nn.Module:
    """A tiny model of a kind whose tokens after a soft prompt would compute wrongly."""
    import transformers as t

    bert = t.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=32)
    bart = dict(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    return {"qa": lambda: t.BertForQuestionAnswering(bert), "choice": lambda: t.BertForMultipleChoice(bert),
            "bart-classifier": lambda: t.BartForSequenceClassification(t.BartConfig(**bart)),
            "scaled-embeddings": lambda: t.MarianMTModel(t.MarianConfig(**bart, scale_embedding=True,
                                                                          pad_token_id=0, decoder_start_token_id=0)),
            }[kind]()


@pytest.mark.parametrize("kind, words", [
    ("qa", "answer positions"), ("choice", "choices"), ("bart-classifier", "takes no input embeddings"),
    ("scaled-embeddings", "scales token embeddings by 4 only when it computes them from input ids")])
def test_a_model_whose_tokens_a_prompt_would_shift_or_unscale_is_refused_at_injection(kind, words):
    model = tiny(kind)
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match=f"PromptTuning cannot adapt .*{words}"):
        PromptTuning(num_virtual_tokens=2).inject(model)  # was: wrong logits and loss (qa, scaled), or a crash
    assert [type(m) for m in model.modules()] == before and not hasattr(model, "prompt_tuning")


@pytest.mark.parametrize("method, heads, peft_loads", [
    (lambda: PromptTuning(num_virtual_tokens=N), None, False),
    (lambda: PromptTuning(num_virtual_tokens=N, modules_to_save=["classifier"]), None, True),
    (lambda: PrefixTuning(num_virtual_tokens=N, modules_to_save=["score"]), "gpt2", False),
], ids=["prompt-no-head", "prompt-head", "prefix-decoder-classifier"])
def test_a_classifier_file_peft_cannot_load_is_written_in_the_native_layout(tmp_path, method, heads, peft_loads):
    import json

    from peft import PeftModel
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from lightning_peft import load_adapter, save_adapter

    torch.manual_seed(0)
    base = (tiny_bert() if heads is None else GPT2ForSequenceClassification(GPT2Config(
        vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=2, n_positions=64, pad_token_id=0))).eval()
    model = method().inject(copy.deepcopy(base))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_adapter(model, tmp_path)
    layout = "peft" if "peft_type" in json.loads((tmp_path / "adapter_config.json").read_text()) else "native"
    assert layout == ("peft" if peft_loads else "native")  # was: peft's layout, which peft failed to load
    assert peft_loads or any("peft" in str(w.message) for w in caught)
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        torch.testing.assert_close(load_adapter(copy.deepcopy(base), tmp_path).eval()(input_ids=ids).logits,
                                   expected, rtol=0, atol=1e-5)
        if peft_loads:
            theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
            torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


PREFIX_MISFITS = {  # config class, model class, settings: layers whose cache is not one key/value shape
    "conv-layers": ("Lfm2Config", "Lfm2ForCausalLM", dict(layer_types=["conv", "full_attention"])),
    "latent-attention": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=16, q_lora_rank=16,
        kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1)),
    "head-sizes-per-layer": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        head_dim=8, global_head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=4)),
}


@pytest.mark.parametrize("kind", list(PREFIX_MISFITS))
def test_prefix_tuning_refuses_layers_whose_cache_is_not_one_key_value_shape_at_injection(kind):
    import transformers

    config_class, model_class, settings = PREFIX_MISFITS[kind]
    config = getattr(transformers, config_class)(vocab_size=VOCAB, hidden_size=H, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64, pad_token_id=0, **settings)
    model = getattr(transformers, model_class)(config)
    with pytest.raises(TypeError, match="PrefixTuning puts the same keys and values before every layer's"):
        PrefixTuning(num_virtual_tokens=N).inject(model)  # was: accepted, then failed at the first step
    assert not hasattr(model, "prefix_tuning")


@pytest.mark.parametrize("method", [PromptTuning, PrefixTuning])
def test_generating_past_the_position_table_is_refused_in_one_line(method):
    model = method(num_virtual_tokens=N).inject(tiny_gpt2()).eval()  # 64 learned positions
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, VOCAB, (1, 56))  # 4 + 56 fit; 4 + 56 + 6 new tokens do not
    with torch.no_grad():
        assert model.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape[1] == 60
        with pytest.raises(ValueError, match=r"generate fewer \(max_new_tokens\).* has 64 learned positions"):
            model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)  # was: IndexError


def roberta_body():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    return RobertaModel(RobertaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=64), add_pooling_layer=False)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "roberta"])  # rotary, learned, and learned past a padding row
def test_a_left_padded_row_computes_with_its_prompt_as_it_does_alone(kind):
    model = PromptTuning(num_virtual_tokens=N).inject(roberta_body() if kind == "roberta" else build(kind)).eval()
    inputs = batch()  # the first row's two pads sit between the prompt and its tokens
    with torch.no_grad():
        padded = model(**inputs)
        alone = model(input_ids=inputs["input_ids"][:1, 2:])
    key = "last_hidden_state" if kind == "roberta" else "logits"
    torch.testing.assert_close(padded[key][0, 2:], alone[key][0], rtol=0, atol=1e-5)


def test_decoding_step_by_step_from_left_padded_rows_continues_their_positions():
    from transformers import DynamicCache

    model = PromptTuning(num_virtual_tokens=N).inject(build("llama")).eval()

    def decode(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True)
        steps = []
        for _ in range(3):
            next_id = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(next_id)], 1)
            out = model(input_ids=next_id, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
        return torch.stack(steps, 1)

    inputs = batch()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padded = decode(inputs["input_ids"], inputs["attention_mask"])[0]
        alone = decode(inputs["input_ids"][:1, 2:], inputs["attention_mask"][:1, 2:])[0]
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)


def test_prefix_tuning_refuses_a_router_loss_over_the_mask_it_widens_and_keeps_the_rest():
    torch.manual_seed(0)
    model = PrefixTuning(4, projection=False).inject(mixtral())
    ids = torch.randint(4, 128, (2, 9))
    model.config.output_router_logits = True
    with pytest.raises(ValueError, match="PrefixTuning cannot train MixtralForCausalLM with output_router_logits=True"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)  # was: a size mismatch in transformers
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)  # no mask: the router loss over the real tokens
    model.config.output_router_logits = False
    assert torch.isfinite(model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss)
