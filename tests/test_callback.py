"""LoRA through the Trainer: what trains, what stays, what a step-0 model computes."""

import logging
import pickle
import warnings

import pytest
import torch
from torch import nn

from lightning_peft import IA3, LoRA, QuantizeBase, adapter_names, merge, trainable_summary, unmerge
from lightning_peft.lora import LoRALayer

from conftest import (
    ConvMLP,
    ImageModule,
    TokenModule,
    image_loader,
    make_trainer,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_loader,
)

R = 4
H = 32  # hidden size of the tiny transformers models
KV = 16  # tiny Llama: 2 key/value heads of 8


def llama_case():
    formula = 2 * (R * (H + H) + R * (H + KV))  # q_proj (H->H) and v_proj (H->KV) in 2 blocks
    return TokenModule(tiny_llama()), token_loader(), dict(target_modules=["q_proj", "v_proj"]), formula


def bert_case():
    per_block = 4 * R * (H + H) + R * (H + 2 * H) + R * (2 * H + H)  # q,k,v,o; intermediate; output
    pooler, classifier = R * (H + H), H * 2 + 2
    return (TokenModule(tiny_bert()), token_loader(),
            dict(target_modules="all-linear", modules_to_save=["classifier"]), 2 * per_block + pooler + classifier)


def gpt2_case():
    formula = 2 * R * (H + 3 * H)  # Conv1D c_attn: H -> 3H
    return TokenModule(tiny_gpt2()), token_loader(), dict(target_modules=["c_attn"]), formula


def conv_mlp_case():
    formula = (R * 1 * 3 * 3 + 4 * R) + R * (4 * 8 * 8 + 32)  # conv: A (r,1,3,3), B (4,r,1,1); fc1
    return ImageModule(ConvMLP()), image_loader(), dict(target_modules=["conv", "fc1"]), formula


CASES = {"llama": llama_case, "bert": bert_case, "gpt2": gpt2_case, "conv_mlp": conv_mlp_case}


@pytest.mark.parametrize("case", CASES)
def test_training_changes_only_adapter_parameters(case):
    module, loader, lora_kwargs, formula = CASES[case]()
    base_before = {n: p.detach().clone() for n, p in module.named_parameters()}
    lora = LoRA(r=R, alpha=8, **lora_kwargs)
    make_trainer([lora], max_steps=3).fit(module, loader)

    assert trainable_summary(module).trainable == formula
    assert trainable_summary(module).methods[0].params == formula
    changed_adapter = 0
    for name, param in module.named_parameters():
        original_name = name.replace(".base_layer", "")
        if original_name in base_before:  # the base model's, modules_to_save originals included
            assert torch.equal(param, base_before[original_name]), f"base weight {name} changed"
            assert not param.requires_grad
        else:
            assert param.requires_grad, name
            changed_adapter += int(not torch.equal(param, base_before.get(original_name, torch.zeros_like(param))))
    assert changed_adapter > 0
    if "modules_to_save" in lora_kwargs:  # the adapter's copy of the classifier head trained too
        assert not torch.equal(module.model.classifier.adapters["default"].weight,
                               base_before["model.classifier.weight"])


@pytest.mark.parametrize("case", CASES)
def test_step_zero_output_equals_base(case):
    module, loader, lora_kwargs, _ = CASES[case]()
    module.eval()
    batch = next(iter(loader))[0]
    before = module(batch)
    LoRA(r=R, alpha=8, **lora_kwargs).inject(module)
    assert torch.equal(module(batch), before)


def test_merge_and_unmerge_after_training():
    module, loader, lora_kwargs, _ = llama_case()
    trainer = make_trainer([LoRA(r=R, alpha=8, **lora_kwargs)], max_steps=4)
    trainer.fit(module, loader)
    module.eval()
    batch = next(iter(loader))[0]
    base_weights = {n.replace(".base_layer", ""): p.detach().clone() for n, p in module.named_parameters()
                    if not p.requires_grad}
    unmerged_logits = module(batch)

    merge(module)
    assert not any(isinstance(m, LoRALayer) for m in module.modules())
    assert not any("adapters" in n for n, _ in module.named_parameters())
    assert torch.allclose(module(batch), unmerged_logits, atol=1e-5)
    module.predict_step = lambda batch, batch_idx: module(batch[0])
    trainer.predict(module, loader)  # setup again: the callback knows its adapter is merged, and adds none
    assert not any(isinstance(m, LoRALayer) for m in module.modules())
    for callback in (trainer.callbacks[0], LoRA(r=R, alpha=8, **lora_kwargs)):  # was: trained, then refused to save
        again = make_trainer([callback], max_steps=8)
        with pytest.raises(ValueError, match="fit: this model has merged adapters, which are in its weights now"):
            again.fit(module, loader)
        assert again.global_step == 0

    unmerge(module)
    for name, param in module.named_parameters():
        if not param.requires_grad:
            assert torch.allclose(param, base_weights[name.replace(".base_layer", "")], atol=1e-6)
    assert torch.allclose(module(batch), unmerged_logits, atol=1e-6)


class BuiltInConfigureModel(TokenModule):
    """Builds its transformers model in ``configure_model``, as large-model users do."""

    def configure_model(self):
        if self.model is None:
            self.model = tiny_llama()


def test_model_built_in_configure_model():
    module = BuiltInConfigureModel()
    lora = LoRA(r=R, alpha=8, target_modules=["q_proj", "v_proj"])
    make_trainer([lora], max_steps=2).fit(module, token_loader())
    assert trainable_summary(module).trainable == llama_case()[3]
    assert sum(isinstance(m, LoRALayer) for m in module.modules()) == 4
    assert "configure_model" not in module.__dict__  # the wrapper is gone after teardown
    # Setting up again (another fit on the same module) is idempotent: nothing is injected twice.
    make_trainer([lora], max_steps=3).fit(module, token_loader())
    assert sum(isinstance(m, LoRALayer) for m in module.modules()) == 4
    assert trainable_summary(module).trainable == llama_case()[3]


def test_two_lora_callbacks_train_the_union():
    module = TokenModule(tiny_llama())
    first = LoRA(r=R, alpha=8, target_modules=["q_proj"], adapter_name="q")
    second = LoRA(r=2, alpha=8, target_modules=["v_proj"], adapter_name="v")
    make_trainer([first, second], max_steps=2).fit(module, token_loader())
    summary = trainable_summary(module)
    assert {row.method: row.params for row in summary.methods} == {
        "LoRA[q]": 2 * R * (H + H), "LoRA[v]": 2 * 2 * (H + KV)}
    assert summary.trainable == 2 * R * (H + H) + 2 * 2 * (H + KV)


def test_summary_is_logged_at_fit_start(caplog):
    module = TokenModule(tiny_llama())
    with caplog.at_level(logging.INFO):
        make_trainer([LoRA(r=R, target_modules=["q_proj"])], max_steps=1).fit(module, token_loader())
    text = caplog.text
    assert "LoRA[default]" in text and f"{2 * R * (H + H):,}" in text


class CountingModule(TokenModule):
    steps = 0

    def training_step(self, batch, batch_idx):
        CountingModule.steps += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(target_modules=["q_porj"]), ValueError, ["q_porj", "q_proj (Linear)", "matched no module"]),
    (dict(target_modules=["input_layernorm"]), TypeError, ["input_layernorm", "LlamaRMSNorm"]),
    (dict(target_modules=["q_proj"], layers=[7]), ValueError, ["layers=[7]"]),
])
def test_bad_targets_fail_at_setup_before_any_step(kwargs, error, words):
    CountingModule.steps = 0
    module = CountingModule(tiny_llama())
    state_before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error) as info:
        make_trainer([LoRA(**kwargs)], max_steps=2).fit(module, token_loader())
    for word in words:
        assert word in str(info.value)
    assert CountingModule.steps == 0
    assert module.state_dict().keys() == state_before.keys()  # nothing was injected


def test_the_names_listed_after_no_match_are_of_modules_holding_weights_not_metrics_or_dropout():
    from torchmetrics.classification import MulticlassAccuracy

    module = CountingModule(tiny_llama())
    module.val_acc = MulticlassAccuracy(2)
    with pytest.raises(ValueError, match="matched no module") as info:
        LoRA(target_modules=["q_porj"]).inject(module)
    listed = str(info.value).split("Module names that exist: ")[1]
    assert "q_proj (Linear)" in listed and "embed_tokens (Embedding)" in listed
    assert "val_acc" not in listed and "act_fn" not in listed and "rotary_emb" not in listed


def test_a_listed_name_that_matches_nothing_is_warned_about_with_the_closest_names():
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"LoRA: target_modules: 'q_porj' matches no module of this model "
                                         r"\(the other names do\); did you mean 'q_proj'\?"):
        LoRA(target_modules=["q_porj", "v_proj"]).inject(model)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".v_proj." in name for name in trained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every name matches: no warning
        LoRA(target_modules=["q_proj", "k_proj"], adapter_name="other").inject(model)
    with pytest.raises(ValueError, match="QuantizeBase: skip_modules=\\['lm_haed'\\] matched no module"):
        QuantizeBase(mode="int8", skip_modules=["lm_haed"]).inject(tiny_llama())


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(r=-1), dict(r=2.5), dict(alpha=0), dict(dropout=1.0),
                                    dict(dropout=-0.1), dict(init="bogus"), dict(checkpoint="half")])
def test_bad_hyperparameters_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        LoRA(**kwargs)


def test_two_adapter_folders_load_in_one_trainer(tmp_path):
    from lightning_peft import adapter_names, save_adapter
    from lightning_peft.registry import LoadAdapter

    for name in ("a", "b"):
        save_adapter(LoRA(r=2, target_modules=["q_proj"]).inject(tiny_llama()), tmp_path / name)
    module = TokenModule(tiny_llama())
    loads = [LoadAdapter(tmp_path / name, adapter_name=name) for name in ("a", "b")]
    make_trainer(loads, max_steps=1).fit(module, token_loader())
    assert adapter_names(module) == ["a", "b"]


def test_modules_to_save_given_as_one_string_is_refused():
    with pytest.raises(ValueError, match=r"LoRA modules_to_save takes a list of module names, e.g. \['classifier'\]; "
                                         "got the string 'classifier'"):
        LoRA(modules_to_save="classifier")


def test_an_adapter_name_injected_again_is_the_same_adapter_or_an_error():
    model = tiny_llama()
    LoRA(target_modules=["q_proj"]).inject(model)
    keys = set(model.state_dict())
    LoRA(target_modules=["q_proj"]).inject(model)  # the same settings: that adapter, left as it is
    LoRA(target_modules=["q_proj"], checkpoint="full").inject(model)  # how it is checkpointed is no setting of it
    assert set(model.state_dict()) == keys
    with pytest.raises(ValueError, match=r"LoRA\[default\] is in this model already, made with target_modules="
                                         r"\['q_proj'\]; give this one another adapter_name"):
        LoRA(target_modules=["k_proj"]).inject(model)
    assert set(model.state_dict()) == keys
    LoRA(target_modules=["k_proj", "v_proj"], exclude_modules=["v_proj"], adapter_name="b").inject(model)
    with pytest.raises(ValueError, match=r"made with exclude_modules=\['v_proj'\]"):  # would adapt v_proj too
        LoRA(target_modules=["k_proj", "v_proj"], adapter_name="b").inject(model)


def test_a_loaded_adapter_trains_on_under_the_callback_of_its_settings_as_the_user_names_its_targets(tmp_path):
    from lightning_peft import load_adapter, save_adapter

    module, loader, lora_kwargs, _ = llama_case()
    make_trainer([LoRA(r=R, alpha=8, **lora_kwargs)], max_steps=2).fit(module, loader)
    save_adapter(module, tmp_path)  # its file lists every target by its full name
    again = load_adapter(TokenModule(tiny_llama()), tmp_path)
    make_trainer([LoRA(r=R, alpha=8, **lora_kwargs)], max_steps=1).fit(again, loader)  # was: refused, other targets
    assert adapter_names(again) == ["default"]
    with pytest.raises(ValueError, match=r"LoRA\[default\] is in this model already, made with target_modules="):
        make_trainer([LoRA(r=R, alpha=8, target_modules=["q_proj"])], max_steps=1).fit(
            load_adapter(TokenModule(tiny_llama()), tmp_path), loader)
    for number, method in enumerate([lambda: IA3(target_modules=["k_proj", "v_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]),
                                     lambda: IA3(), lambda: LoRA(r=R), lambda: LoRA(r=R, target_modules=".*v_proj.*")]):
        make_trainer([method()], max_steps=1).fit(module := TokenModule(tiny_llama()), loader)  # defaults, regexes
        save_adapter(module, tmp_path / str(number))
        make_trainer([method()], max_steps=1).fit(load_adapter(TokenModule(tiny_llama()), tmp_path / str(number)),
                                                  loader)


def test_a_new_trainer_with_the_same_method_evaluates_the_trained_adapter():
    module, loader, lora_kwargs, _ = llama_case()
    make_trainer([LoRA(r=R, alpha=8, **lora_kwargs)], max_steps=2).fit(module, loader)
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    module.predict_step = lambda batch, batch_idx: module(batch[0])
    make_trainer([LoRA(r=R, alpha=8, **lora_kwargs)]).predict(module, loader)  # a second Trainer, as after a fit
    assert adapter_names(module) == ["default"]
    assert all(torch.equal(p, trained[n]) for n, p in module.named_parameters() if n in trained)


def test_a_fit_that_trains_an_earlier_trainer_s_adapter_too_says_so():
    module, loader, lora_kwargs, _ = llama_case()
    make_trainer([LoRA(r=R, alpha=8, **lora_kwargs)], max_steps=1).fit(module, loader)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*none of this trainer's methods made")
        make_trainer([LoRA(r=R, alpha=8, **lora_kwargs)], max_steps=2).fit(module, loader)  # its own adapter: quiet
    with pytest.warns(UserWarning, match=r"the model holds LoRA\[default\], which none of this trainer's methods "
                                         r"made \(an earlier run's\): it trains in this fit too"):
        make_trainer([IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])],
                     max_steps=3).fit(module, loader)  # was: LoRA trained too, its checkpoints naming IA3 alone


@pytest.mark.parametrize("precision, adapter_dtype", [
    ("32-true", torch.float32),
    ("bf16-mixed", torch.float32),
    ("16-mixed", torch.float32),  # Lightning runs it as bf16-mixed on CPU
    ("bf16-true", torch.bfloat16),
])
def test_precision_settings(precision, adapter_dtype):
    module = TokenModule(tiny_llama())
    make_trainer([LoRA(r=R, target_modules=["q_proj", "v_proj"])], max_steps=2, precision=precision).fit(
        module, token_loader())
    adapters = [p for n, p in module.named_parameters() if "adapters" in n]
    assert adapters and all(p.dtype == adapter_dtype for p in adapters)
    assert all(torch.isfinite(p).all() for p in adapters)
    assert any(p.abs().sum() > 0 for n, p in module.named_parameters() if n.endswith("lora_B"))


def test_a_loaded_folder_of_another_method_under_a_name_already_taken_still_loads(tmp_path):
    from lightning_peft import IA3, save_adapter
    from lightning_peft.core.ownership import adapter_refs
    from lightning_peft.registry import LoadAdapter

    save_adapter(IA3(target_modules=["v_proj"], feedforward_modules=[]).inject(tiny_llama()), tmp_path / "ia3")
    model = LoRA(r=4, target_modules=["q_proj"]).inject(tiny_llama())  # LoRA[default]
    LoadAdapter(tmp_path / "ia3").apply(model)  # was: skipped, as if IA3[default] were there
    LoadAdapter(tmp_path / "ia3").apply(model)  # a second run: loaded once
    assert sorted(map(str, adapter_refs(model))) == ["IA3[default]", "LoRA[default]"]


def test_callbacks_pickle_for_launchers_that_need_it():
    method = LoRA(r=4, target_modules=["q_proj"])
    method.inject(tiny_llama())  # it has seen a module (a weak set of them, which pickle cannot take)
    again = pickle.loads(pickle.dumps(method))
    assert again.config() == method.config()
    again.inject(tiny_llama())  # still works


@pytest.mark.parametrize("strategy", ["ddp_fork", "ddp_spawn"])
def test_multiprocessing_launchers_are_refused_at_setup_and_the_model_is_left_as_it_was(strategy):
    from torch.multiprocessing import ProcessRaisedException

    module = TokenModule(tiny_llama())
    trainer = make_trainer([LoRA(r=4, target_modules=["q_proj"])], devices=2, strategy=strategy)
    with pytest.raises(ProcessRaisedException, match="starts its processes by multiprocessing"):
        trainer.fit(module, token_loader())  # was: trained copies, then a KeyError (fork) or a pickling error (spawn)
    assert not any(isinstance(m, LoRALayer) for m in module.modules())


def test_targets_that_the_forward_never_calls_are_refused_before_the_first_backward():
    model = tiny_llama()
    model.unused = nn.Linear(32, 32)  # as T5's `shared`: its weight is used elsewhere, the module is never called
    trainer = make_trainer([LoRA(r=R, target_modules=["unused"])])
    with pytest.raises(ValueError, match=r"the loss depends on no trainable parameter, so nothing would train: "
                                         r"model\.unused\.adapters\.default\.lora_A.*the forward never calls"):
        trainer.fit(TokenModule(model), token_loader())  # was: torch's "element 0 of tensors does not require grad"
    assert trainer.global_step == 0


def test_weight_averaging_is_refused_where_it_would_break_the_run_and_else_warned():
    from lightning.pytorch.callbacks import StochasticWeightAveraging
    from lightning.pytorch.callbacks.weight_averaging import EMAWeightAveraging

    def fit(callbacks):
        torch.manual_seed(0)
        module = TokenModule(tiny_llama())
        try:
            make_trainer(callbacks, max_steps=2).fit(module, token_loader())
        except ValueError:
            assert not adapter_names(module)  # refused at setup: the model as it was
            raise

    for averaging in (lambda: StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1),
                      lambda: EMAWeightAveraging(decay=0.9)):
        with pytest.raises(ValueError, match="comes before the PEFT callbacks in trainer.callbacks, so it would copy "
                                             "the model before they change it"):  # was: a size mismatch mid-run
            fit([averaging(), LoRA(r=4)])
        with pytest.raises(ValueError, match="averages every parameter of the model, a quantized base's codes too"):
            fit([QuantizeBase("nf4"), LoRA(r=4), averaging()])  # was: EMA moved 2,400 of 11,847 codes in 10 steps
        with pytest.warns(UserWarning, match="its checkpoints hold the whole model beside the adapters"):
            fit([LoRA(r=4), averaging()])
