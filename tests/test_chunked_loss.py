"""The causal-LM task's chunked loss: the model's own loss and gradients, without the whole batch's logits."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_causal_lm import tiny_lm_dir  # noqa: F401  (the fixture: a model folder the task loads a tokenizer from)

from lightning_peft import LoRA, PromptTuning
from lightning_peft.tasks import CausalLM
from lightning_peft.tasks.chunked_loss import LinearCrossEntropy

from conftest import VOCAB, tiny_gpt2, tiny_llama


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1e-5 of the largest element: the same sums, in chunks."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * max(expected.abs().max().item(), 1.0))


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_equals_the_plain_loss(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 50, (40,), generator=g)
    labels[::3] = -100
    expected = F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=-100)
    tensors = [t for t in (hidden, weight, bias) if t is not None]
    expected_grads = torch.autograd.grad(expected * 3, tensors)
    got = LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk)
    _close(got, expected)
    for a, b in zip(torch.autograd.grad(got * 3, tensors), expected_grads, strict=True):
        _close(a, b)


def _tied_llama():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    return model


def _lora(model):
    return LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "c_attn"]).inject(model)


def _prompt_tuned(model):
    return PromptTuning(num_virtual_tokens=3).inject(model)


def _mixtral_with_router_loss():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.5)
    return LoRA(r=4, target_modules=["q_proj", "v_proj"]).inject(MixtralForCausalLM(config))


MODELS = {
    "llama+lora": lambda: _lora(tiny_llama()),
    "mixtral+router loss": _mixtral_with_router_loss,
    "gpt2+lora": lambda: _lora(tiny_gpt2()),
    "tied llama, all trained": lambda: _tied_llama().requires_grad_(True),
    "llama+prompt tuning": lambda: _prompt_tuned(tiny_llama()),
}


def _task(model_dir, model) -> CausalLM:
    task = CausalLM(model=str(model_dir))
    task.model = model.train()
    return task


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt without loss
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # padding at the end of one row
    labels[2, 7:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", list(MODELS))
def test_task_loss_and_gradients_equal_the_models_own(tiny_lm_dir, kind):  # noqa: F811
    torch.manual_seed(0)
    task = _task(tiny_lm_dir, MODELS[kind]())
    trained = [p for p in task.parameters() if p.requires_grad]
    for p in trained:  # non-zero adapters, so their gradients mean something
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    batch = _batch()
    torch.manual_seed(5)  # the same dropout masks (GPT-2's) in both forwards
    expected = task(**batch).loss
    expected_grads = torch.autograd.grad(expected, trained)
    torch.manual_seed(5)
    got = task.chunked_loss(batch)
    assert got is not None
    _close(got, expected)
    for a, b in zip(torch.autograd.grad(got, trained), expected_grads, strict=True):
        _close(a, b)


def test_no_tensor_of_the_logits_size_is_kept_for_backward(tiny_lm_dir):  # noqa: F811
    task = _task(tiny_lm_dir, _lora(tiny_llama()))
    batch, sizes = _batch(), []
    logits_size = batch["input_ids"].numel() * VOCAB

    def keep_size(t):
        sizes.append(t.numel())
        return t

    for chunked in (False, True):
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(keep_size, lambda t: t):
            task.chunked_loss(batch) if chunked else task(**batch).loss
        assert (max(sizes) >= logits_size) is not chunked  # the plain loss does keep them: the check can fail


def test_a_model_that_transforms_its_logits_falls_back_to_its_own_loss(tiny_lm_dir):  # noqa: F811
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0)
    task = _task(tiny_lm_dir, Gemma2ForCausalLM(config))
    with pytest.warns(UserWarning, match="transforms or copies its logits after the output projection"):
        assert task.chunked_loss(_batch()) is None
    assert task.use_chunked_loss is False
    # An adapted head is no plain nn.Linear: the model's own loss, silently.
    task = _task(tiny_lm_dir, LoRA(r=2, target_modules=["lm_head"]).inject(tiny_llama()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert task.chunked_loss(_batch()) is None


def test_labels_that_are_no_token_and_not_ignored_are_refused(tiny_lm_dir):  # noqa: F811
    task, batch = _task(tiny_lm_dir, _lora(tiny_llama())), _batch()
    batch["labels"][1, 3] = -1  # the model's own loss raises on it; counted as token 0 it would train silently
    with pytest.raises(RuntimeError, match=f"labels must be token ids below {VOCAB} or -100"):
        task.chunked_loss(batch)


def test_float16_autocast_takes_the_models_own_loss(tiny_lm_dir):  # noqa: F811
    task = _task(tiny_lm_dir, _lora(tiny_llama()))
    with torch.autocast("cpu", dtype=torch.float16):  # the gradient would be made before loss scaling
        assert task.chunked_loss(_batch()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert task.chunked_loss(_batch()) is not None
    assert task.use_chunked_loss  # only that step


def test_per_row_soft_prompts_of_several_lengths_take_the_models_own_loss_without_turning_it_off(
        tiny_lm_dir):  # noqa: F811
    from lightning_peft import per_row_adapters

    model = PromptTuning(num_virtual_tokens=2, adapter_name="a").inject(tiny_llama())
    task = _task(tiny_lm_dir, PromptTuning(num_virtual_tokens=4, adapter_name="b").inject(model))
    forwards = []
    task.model.model.register_forward_hook(lambda *_: forwards.append(None))
    with warnings.catch_warnings(), per_row_adapters(task.model, ["a", "b", None]):
        warnings.simplefilter("error")  # was: "transforms or copies its logits", the chunked loss off for good
        assert task.chunked_loss(_batch()) is None
    assert not forwards  # decided before any forward: the step's own forward is the only one
    with per_row_adapters(task.model, ["a", "a", "a"]):  # one length: nothing is packed, the chunked loss is exact
        assert task.chunked_loss(_batch()) is not None
    assert task.use_chunked_loss and task.chunked_loss(_batch()) is not None


def test_falling_back_leaves_the_random_state_as_a_plain_step_finds_it(tiny_lm_dir):  # noqa: F811
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0)
    task = _task(tiny_lm_dir, LoRA(r=2, dropout=0.5, target_modules=["q_proj"]).inject(Gemma2ForCausalLM(config)))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="training uses its own loss"):
        assert task.chunked_loss(_batch()) is None  # a forward that drew dropout masks, then was dropped
    after_fallback = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after_fallback, torch.rand(4))  # so a resumed run, which probes again, draws the same
