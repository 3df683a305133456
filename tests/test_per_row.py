"""per_row_adapters: each row of one batch with its own adapter equals that row run alone with only its adapter."""

import pytest
import torch
from torch import nn

from lightning_peft import (
    IA3,
    Adapter,
    LoRA,
    PrefixTuning,
    PromptTuning,
    Selective,
    delete_adapter,
    disable_adapters,
    merge,
    per_row_adapters,
    set_adapter,
)

from conftest import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

NAMES = ["a", None, "b", "a", "b", None]


def randomized(model):
    """Move every adapter parameter away from its identity start, so each adapter changes the output."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


def with_two(method, model, **settings):
    for name in ("a", "b"):
        method(adapter_name=name, **settings).inject(model)
    return randomized(model)


def alone(model, name, **inputs):
    """The output of ``model`` with only ``name`` active (the base model for None)."""
    if name is None:
        with disable_adapters(model):
            return model(**inputs).logits
    set_adapter(model, name)
    return model(**inputs).logits


def check_rows_match_single_runs(model, names=NAMES, **inputs):
    with torch.no_grad():
        with per_row_adapters(model, names):
            mixed = model(**inputs).logits
        for i, name in enumerate(names):
            single = alone(model, name, **{k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in inputs.items()})
            torch.testing.assert_close(mixed[i:i + 1], single, atol=1e-5, rtol=1e-5)
    return mixed


def token_inputs(rows=6, length=7, padded=False):
    ids = torch.randint(0, VOCAB, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    if padded:
        mask[1, :3] = 0  # left padding on one row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("settings", [
    dict(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], use_rslora=True),
    dict(r=4, target_modules=["q_proj", "down_proj"], use_dora=True),
], ids=["lora", "lora-embedding-rslora", "dora"])
def test_lora_rows_equal_single_adapter_runs(settings):
    model = with_two(LoRA, tiny_llama(), **settings)
    check_rows_match_single_runs(model, **token_inputs(padded=True))


def test_lora_of_different_ranks_and_layers_per_row():
    model = tiny_llama()
    LoRA(r=2, target_modules=["q_proj"], adapter_name="a").inject(model)
    LoRA(r=6, target_modules=["v_proj", "up_proj"], adapter_name="b").inject(model)
    check_rows_match_single_runs(randomized(model), **token_inputs())


def test_ia3_rows_equal_single_adapter_runs():
    model = with_two(IA3, tiny_llama(), target_modules=["k_proj", "v_proj", "down_proj"],
                     feedforward_modules=["down_proj"])
    check_rows_match_single_runs(model, **token_inputs())


def test_adapter_rows_equal_single_adapter_runs():
    model = with_two(Adapter, tiny_gpt2(), bottleneck_dim=8)
    check_rows_match_single_runs(model, **token_inputs())


def test_prompt_rows_of_one_length_equal_single_adapter_runs():
    model = with_two(PromptTuning, tiny_llama(), num_virtual_tokens=3)
    check_rows_match_single_runs(model, names=["a", "b", "b", "a"], **token_inputs(rows=4, padded=True))


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert], ids=["decoder", "encoder"])
def test_prompts_of_different_lengths_and_none_are_padded_and_masked(build):
    model = build()
    PromptTuning(num_virtual_tokens=2, adapter_name="a").inject(model)
    PromptTuning(num_virtual_tokens=5, adapter_name="b").inject(model)
    mixed = check_rows_match_single_runs(randomized(model), **token_inputs())
    assert mixed.shape[:2] == (len(NAMES), 2 if build is tiny_bert else 7)


def test_greedy_generation_with_prompts_per_row_equals_each_row_alone():
    model = with_two(PromptTuning, tiny_llama(), num_virtual_tokens=3)
    names, inputs = ["a", "b", "b"], token_inputs(rows=3, length=5)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), per_row_adapters(model, names):
        together = model.generate(**inputs, **settings)
    for i, name in enumerate(names):
        set_adapter(model, name)
        with torch.no_grad():
            assert torch.equal(together[i:i + 1], model.generate(**{k: v[i:i + 1] for k, v in inputs.items()},
                                                                 **settings))


def test_generating_with_prompts_of_different_lengths_is_refused_before_any_step():
    model = tiny_llama()
    PromptTuning(num_virtual_tokens=2, adapter_name="a").inject(model)
    with torch.no_grad(), per_row_adapters(model, ["a", None]), pytest.raises(ValueError, match="generate each group"):
        model.generate(**token_inputs(rows=2), max_new_tokens=2, pad_token_id=0)


def test_keeping_only_the_last_logits_with_prompts_of_different_lengths_is_refused():
    model = tiny_llama()
    PromptTuning(num_virtual_tokens=2, adapter_name="a").inject(model)
    PromptTuning(num_virtual_tokens=5, adapter_name="b").inject(model)
    with torch.no_grad(), per_row_adapters(model, ["a", "b"]):
        with pytest.raises(ValueError, match="logits_to_keep would keep padding"):
            model(**token_inputs(rows=2), logits_to_keep=1)  # the rows' last positions: padding for row a
        assert model(**token_inputs(rows=2), logits_to_keep=0).logits.shape[1] == 7  # every position: fine


def test_a_saved_decoder_block_splits_rows_without_a_cache_and_refuses_to_split_one():
    model = tiny_llama()
    for name in ("a", "b"):
        LoRA(r=2, target_modules=["layers.0.self_attn.q_proj"], modules_to_save=["layers.1"],
             adapter_name=name).inject(model)
    randomized(model)
    inputs = token_inputs(rows=4)
    check_rows_match_single_runs(model, ["a", "a", "a", "a"], **inputs)  # one copy for every row: the cache is fine
    check_rows_match_single_runs(model, ["a", "b", None, "a"], use_cache=False, **inputs)
    positions = torch.arange(7).repeat(4, 1)  # given: each row's rotary (cos, sin) reaches the block, split by row
    check_rows_match_single_runs(model, ["a", "b", None, "b"], use_cache=False, position_ids=positions, **inputs)
    with torch.no_grad(), per_row_adapters(model, ["a", "b", None, "a"]):
        with pytest.raises(ValueError, match="copies of a LlamaDecoderLayer would each add their rows to one cache"):
            model(**inputs)  # transformers' default: use_cache=True


def test_a_saved_module_holding_adapted_layers_is_refused_where_its_rows_split():
    model = tiny_bert()
    LoRA(r=4, target_modules=["value", "classifier"], adapter_name="b").inject(model)
    LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"], adapter_name="a").inject(model)
    with torch.no_grad(), per_row_adapters(randomized(model), ["a", "b", None, "a"]):
        with pytest.raises(ValueError, match="copies of a LoRALinear hold LoRA layers, which would see only some"):
            model(**token_inputs(rows=4))


def test_methods_mixed_on_one_model_route_by_name():
    model = tiny_llama()
    LoRA(r=4, target_modules=["q_proj"], adapter_name="a").inject(model)
    IA3(target_modules=["v_proj"], feedforward_modules=[], adapter_name="a").inject(model)
    Adapter(bottleneck_dim=4, target_modules=["o_proj"], adapter_name="b").inject(model)
    PromptTuning(num_virtual_tokens=2, adapter_name="b").inject(model)
    check_rows_match_single_runs(randomized(model), **token_inputs())


def test_each_adapter_gets_gradients_from_its_rows_only():
    model = with_two(LoRA, tiny_llama(), r=4, target_modules=["q_proj", "v_proj"]).train()
    inputs = token_inputs()
    with per_row_adapters(model, NAMES):
        logits = model(**inputs).logits
    logits[[0, 3]].sum().backward()  # the rows of "a" only
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".a." in n and "lora_B" in n)
    assert all(g is None or not g.any() for n, g in grads.items() if ".b." in n)


def routed_gradients(model, names, inputs, checkpointing=None):
    """Each trainable tensor's gradient of a routed forward whose backward runs after the block, as Lightning's does."""
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    with per_row_adapters(model.train(), names):
        loss = model(**inputs).logits.pow(2).mean()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("method", [LoRA, IA3, Adapter], ids=["lora", "ia3", "adapter"])
def test_checkpointed_layers_recompute_with_each_rows_adapter_after_the_block(method, reentrant):
    inputs = token_inputs()
    torch.manual_seed(0)
    plain = routed_gradients(with_two(method, tiny_llama()), NAMES, inputs)
    torch.manual_seed(0)
    checkpointed = routed_gradients(with_two(method, tiny_llama()), NAMES, inputs, checkpointing=reentrant)
    for name, grad in plain.items():  # was: recomputed with every adapter on every row (or a CheckpointError)
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_layers_under_torch_s_checkpoint_wrapper_recompute_with_each_rows_adapter_too():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    inputs = token_inputs()
    torch.manual_seed(0)
    plain = routed_gradients(with_two(LoRA, tiny_llama()), NAMES, inputs)
    torch.manual_seed(0)
    model = with_two(LoRA, tiny_llama())
    layers = model.model.layers  # as FSDP's activation checkpointing wraps them
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    functions = [layer.checkpoint_fn for layer in layers]
    wrapped = routed_gradients(model, NAMES, inputs)  # was: a CheckpointError (reentrant: wrong gradients)
    for name, grad in plain.items():
        torch.testing.assert_close(wrapped[name.replace("layers.0.", "layers.0._checkpoint_wrapped_module.").replace(
            "layers.1.", "layers.1._checkpoint_wrapped_module.")], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert [layer.checkpoint_fn for layer in layers] == functions  # put back after the block


def test_the_block_restores_what_was_active_and_nests():
    model = with_two(LoRA, tiny_llama(), r=4, target_modules=["q_proj"])
    set_adapter(model, "b")
    inputs = token_inputs(rows=2)
    with torch.no_grad():
        before = model(**inputs).logits
        with per_row_adapters(model, ["a", "a"]):
            with per_row_adapters(model, [None, None]):
                inner = model(**inputs).logits
            outer = model(**inputs).logits
        after = model(**inputs).logits
        assert torch.equal(after, before)
        assert torch.allclose(outer, alone(model, "a", **inputs), atol=1e-6)
        assert torch.allclose(inner, alone(model, None, **inputs), atol=1e-6)


def test_inside_a_block_merge_set_and_delete_adapter_are_refused_and_disable_adapters_gives_every_row_the_base():
    model = with_two(LoRA, tiny_llama(), r=4, target_modules=["q_proj"])
    inputs = token_inputs(rows=2)
    with torch.no_grad(), per_row_adapters(model, ["a", "b"]):
        with pytest.raises(ValueError, match="merge inside a per_row_adapters block would give every row"):
            merge(model)
        with pytest.raises(ValueError, match="set_adapter inside a per_row_adapters block: .* half undone"):
            set_adapter(model, "b")  # was: quietly undone at the block's end
        for name in ("a", "b"):  # was: the active 'a' deleted before a refusal; 'b' deleted, its row the base's
            with pytest.raises(ValueError, match="delete_adapter inside a per_row_adapters block: .* half undone"):
                delete_adapter(model, name)
        with disable_adapters(model):
            base = model(**inputs).logits
        routed = model(**inputs).logits
    torch.testing.assert_close(base, alone(model, None, **inputs))
    torch.testing.assert_close(routed[1:], alone(model, "b", **{k: v[1:] for k, v in inputs.items()}))


ROUTINGS = [["a", "b", None, "a", "b", None], ["b", "a", "a", None, None, "b"], ["a"] * 6, [None] * 6]


def compiled_counting(model):
    """``model`` compiled with a backend that records each graph it compiles, and that record."""
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    return torch.compile(model, backend=counting_backend), graphs


def check_compiled_rows_match_single_runs(model, compiled, names, inputs):
    with torch.no_grad():
        with per_row_adapters(model, names):
            got = compiled(**inputs).logits
        for i, name in enumerate(names):
            one_row = {k: v[i:i + 1] for k, v in inputs.items()}
            torch.testing.assert_close(got[i:i + 1], alone(model, name, **one_row), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [
    lambda: with_two(LoRA, tiny_llama(), r=4, target_modules=["q_proj", "v_proj"]),
    lambda: with_two(LoRA, tiny_llama(), r=4, target_modules=["q_proj", "down_proj"], use_dora=True),
    lambda: with_two(IA3, tiny_llama(), target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    lambda: with_two(Adapter, tiny_gpt2(), bottleneck_dim=8),
    lambda: with_two(LoRA, tiny_bert(), r=4, target_modules=["query"], modules_to_save=["classifier"]),
], ids=["lora", "dora", "ia3", "adapter", "own-heads"])
def test_a_compiled_model_follows_every_routing_with_one_compilation(build):
    model = build()
    compiled, graphs = compiled_counting(model)
    inputs = token_inputs()
    check_compiled_rows_match_single_runs(model, compiled, ROUTINGS[0], inputs)
    compiled_once = len(graphs)
    assert compiled_once > 0
    for names in ROUTINGS[1:]:
        check_compiled_rows_match_single_runs(model, compiled, names, inputs)
    assert len(graphs) == compiled_once  # a new routing compiled nothing


def test_a_compiled_model_gives_each_adapter_gradients_from_its_rows_only():
    model = with_two(LoRA, tiny_llama(), r=4, target_modules=["q_proj", "v_proj"]).train()
    compiled, _ = compiled_counting(model)
    with per_row_adapters(model, NAMES):
        logits = compiled(**token_inputs()).logits
    logits[[0, 3]].sum().backward()  # the rows of "a" only
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".a." in n and "lora_B" in n)
    assert all(g is None or not g.any() for n, g in grads.items() if ".b." in n)


def test_compiled_prompts_per_row_equal_single_adapter_runs():
    model = tiny_llama()
    PromptTuning(num_virtual_tokens=2, adapter_name="a").inject(model)
    PromptTuning(num_virtual_tokens=4, adapter_name="b").inject(model)
    compiled, _ = compiled_counting(randomized(model))
    inputs = token_inputs()
    for names in ROUTINGS:
        check_compiled_rows_match_single_runs(model, compiled, names, inputs)


def test_bad_routing_is_one_clear_error():
    model = with_two(LoRA, tiny_llama(), r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="no adapter named 'c'; this model has: a, b"):
        with per_row_adapters(model, ["a", "c"]):
            pass
    with pytest.raises(TypeError, match="adapter names"):
        with per_row_adapters(model, ["a", 1]):
            pass
    with pytest.raises(ValueError, match="given 2 names, but a LoRA layer got a batch of 3 rows"):
        with per_row_adapters(model, ["a", "b"]):
            model(**token_inputs(rows=3))
    PrefixTuning(num_virtual_tokens=2, adapter_name="p").inject(model)
    with pytest.raises(ValueError, match=r"PrefixTuning \(PrefixInjector\) adapters have no per-row forward"):
        with per_row_adapters(model, ["a", "p"]):
            pass
    delete_adapter(model, "p")
    merge(model)
    with pytest.raises(ValueError, match="merged adapters"):
        with per_row_adapters(model, ["a", "b"]):
            pass


def test_a_part_without_the_named_adapters_computes_as_its_base():
    model = tiny_llama()
    LoRA(r=4, target_modules=["q_proj"], adapter_name="a").inject(model)
    PrefixTuning(num_virtual_tokens=2, adapter_name="p").inject(model)
    model = randomized(model)
    inputs = token_inputs(rows=2)
    with torch.no_grad():
        with per_row_adapters(model, ["a", None]):
            mixed = model(**inputs).logits
        set_adapter(model, "a")
        torch.testing.assert_close(mixed[:1], model(**{k: v[:1] for k, v in inputs.items()}).logits)


def test_names_given_as_an_iterator_route_as_a_list_does():
    model = with_two(LoRA, tiny_llama(), r=4, target_modules=["q_proj", "v_proj"])
    inputs = token_inputs()
    with torch.no_grad():
        with per_row_adapters(model, NAMES):
            expected = model(**inputs).logits
        with per_row_adapters(model, iter(NAMES)):  # was: "given 0 names" (the check spent the iterator)
            torch.testing.assert_close(model(**inputs).logits, expected, atol=0, rtol=0)


def test_beam_search_takes_each_name_once_per_beam_and_says_so_when_not():
    model = with_two(LoRA, tiny_llama(), r=4, target_modules=["q_proj", "v_proj"])
    names, inputs = ["a", "b"], token_inputs(rows=2, length=5)
    settings = dict(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with pytest.raises(ValueError, match="num_beams or num_return_sequences k makes k rows of each: repeat each"):
            with per_row_adapters(model, names):
                model.generate(**inputs, **settings)
        with per_row_adapters(model, [n for n in names for _ in range(2)]):
            together = model.generate(**inputs, **settings)
        for i, name in enumerate(names):
            set_adapter(model, name)
            assert torch.equal(together[i:i + 1], model.generate(**{k: v[i:i + 1] for k, v in inputs.items()},
                                                                 **settings))


def test_compiled_decoding_with_rows_of_one_prompt_length_works_when_the_model_holds_others():
    model = tiny_llama()
    PromptTuning(num_virtual_tokens=3, adapter_name="a").inject(model)
    PromptTuning(num_virtual_tokens=6, adapter_name="b").inject(model)
    compiled, _ = compiled_counting(randomized(model))
    ids = torch.randint(0, VOCAB, (2, 5))

    def two_steps(forward):
        with torch.no_grad(), per_row_adapters(model, ["a", "a"]):
            first = forward(input_ids=ids, use_cache=True)
            return forward(input_ids=first.logits[:, -1:].argmax(-1), past_key_values=first.past_key_values,
                           use_cache=True).logits

    torch.testing.assert_close(two_steps(compiled), two_steps(model))  # was: refused, padded to b's 6 tokens


def test_rows_naming_an_adapter_of_the_model_s_own_parameters_beside_other_rows_are_refused():
    model = tiny_llama()
    LoRA(r=4, target_modules=["q_proj"], adapter_name="a").inject(model)
    Selective(modules=["k_proj"], adapter_name="kproj").inject(model)  # trains the model's k_proj: every row's
    x = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match=r"rows name 'kproj', whose adapter trains the model's own parameters "
                                         r"\(model.layers.0.self_attn.k_proj.weight, "):
        with per_row_adapters(model, ["a", "kproj"]):
            pass
    with per_row_adapters(model, ["kproj", "kproj"]):  # every row: as set_adapter
        model(x)
    with per_row_adapters(model, ["a", None]):  # named by no row: shared by every row, as a multi-task fit's
        model(x)
    LoRA(r=4, target_modules=["v_proj"], adapter_name="kproj").inject(model)  # the name, not a copy of kproj's own
    with per_row_adapters(model, ["a", None]):
        model(x)
    Selective(modules=["v_proj"], modules_to_save=["lm_head"], adapter_name="headed").inject(model)
    with pytest.raises(ValueError, match="a row names no adapter, but 'headed' trains the model's own parameters .* "
                                         "and copies of modules of its own"):  # was: its parameters, the base's head
        with per_row_adapters(model, ["a", None]):
            pass


def test_adapted_layers_in_sequence_first_attention_are_refused():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)  # batch_first=False: (seq, batch, d)
    LoRA(r=2, target_modules=["linear1"], adapter_name="a").inject(layer)
    LoRA(r=2, target_modules=["linear1"], adapter_name="b").inject(layer)
    with pytest.raises(ValueError, match="computes sequence-first \\(batch_first=False\\)"):
        with per_row_adapters(layer, ["a", "b"]):  # was, with as many positions as rows: routed by position
            pass
    wide = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    LoRA(r=2, target_modules=["linear1"], adapter_name="a").inject(wide)
    LoRA(r=2, target_modules=["linear1"], adapter_name="b").inject(wide)
    with per_row_adapters(wide, ["a", "b"]):
        wide(torch.randn(2, 2, 8))
