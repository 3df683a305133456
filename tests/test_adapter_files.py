"""Adapter folders in peft's layout, both directions; named adapters; bad files."""

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from lightning_peft import (
    IA3,
    Adapter,
    LoRA,
    delete_adapter,
    disable_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
    trainable_summary,
)
from lightning_peft.lora import LoRALayer

from conftest import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "embed_tokens"])),
    "llama-dora-rslora": (tiny_llama, dict(target_modules=["q_proj", "o_proj"], use_dora=True, use_rslora=True)),
    "bert-head": (tiny_bert, dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"])),
}
IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def last_hidden(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, output_hidden_states=True).hidden_states[-1]


def randomize_trainable(model, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("case", CASES)
def test_ours_to_peft(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    ours = copy.deepcopy(base)
    LoRA(r=4, alpha=8, **kwargs).inject(ours)
    randomize_trainable(ours)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8

    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.allclose(logits(theirs), logits(ours), atol=1e-5)
    assert not torch.allclose(logits(base), logits(ours), atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("case", CASES)
def test_peft_to_ours(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    peft_kwargs = dict(r=4, lora_alpha=8, target_modules=kwargs["target_modules"],
                       use_dora=kwargs.get("use_dora", False),
                       use_rslora=kwargs.get("use_rslora", False), modules_to_save=kwargs.get("modules_to_save"))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(**peft_kwargs))
    randomize_trainable(theirs)
    theirs.save_pretrained(tmp_path)

    ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)
    # Loaded adapters train on: they are the trainable parameters, the base is frozen.
    assert trainable_summary(ours).trainable == theirs.get_nb_trainable_parameters()[0]


def test_a_peft_classifier_file_loads_without_warnings_about_heads_the_model_lacks(tmp_path):
    base = tiny_bert()  # peft's SEQ_CLS adds both classifier and score to modules_to_save: BERT has no score
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    randomize_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_adapter(copy.deepcopy(base), tmp_path)  # was: "LoRA modules_to_save: target_modules: 'score'..."
    assert not [w for w in caught if "matches no module" in str(w.message)]
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)
    with pytest.warns(UserWarning, match=r"^LoRA: modules_to_save: 'classifer' matches no module of this model \(the "
                                         r"other names do\); did you mean 'classifier'\?"):
        LoRA(r=4, target_modules=["query"], modules_to_save=["classifier", "classifer"]).inject(copy.deepcopy(base))


def test_round_trip_through_our_own_files(tmp_path):
    model = tiny_llama()
    base = copy.deepcopy(model)
    LoRA(r=4, target_modules=["q_proj"], use_dora=True).inject(model)
    randomize_trainable(model)
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(base, tmp_path / "adapter")
    assert torch.allclose(logits(again), logits(model), atol=1e-6)


def two_adapter_model(base=None):
    model = copy.deepcopy(base) if base is not None else tiny_llama()
    LoRA(r=4, target_modules=["q_proj", "v_proj"], adapter_name="a").inject(model)
    LoRA(r=2, target_modules=["q_proj"], adapter_name="b").inject(model)
    randomize_trainable(model)
    return model


def only_adapter(base, two, name, **kwargs):
    """A copy of ``base`` carrying adapter ``name`` alone, with the tensors ``two`` holds for it."""
    model = copy.deepcopy(base)
    LoRA(adapter_name=name, **kwargs).inject(model)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(two.get_parameter(param_name))
    return model


def test_named_adapters_switch_and_disable():
    base = tiny_llama()  # never injected
    model = two_adapter_model(base)
    alone_a = only_adapter(base, model, "a", r=4, target_modules=["q_proj", "v_proj"])
    alone_b = only_adapter(base, model, "b", r=2, target_modules=["q_proj"])
    both = logits(model)
    set_adapter(model, "a")
    assert torch.allclose(logits(model), logits(alone_a), atol=1e-6)
    set_adapter(model, "b")
    only_b = logits(model)
    assert torch.allclose(only_b, logits(alone_b), atol=1e-6)
    assert not torch.allclose(logits(alone_a), only_b, atol=1e-4)
    assert not torch.allclose(logits(alone_a), both, atol=1e-4)
    with disable_adapters(model):
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), only_b)  # the context restores what was active
    with pytest.raises(ValueError, match="no adapter named 'c'; this model has: a, b"):
        set_adapter(model, "c")


def test_each_named_adapter_saves_on_its_own(tmp_path):
    model = two_adapter_model()
    set_adapter(model, "a")
    expected_a = logits(model)
    save_adapter(model, tmp_path / "a", adapter_name="a")
    fresh = tiny_llama()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                           if "adapters" not in k})
    assert torch.allclose(logits(load_adapter(fresh, tmp_path / "a", adapter_name="a")), expected_a, atol=1e-6)


def test_delete_adapter_restores_plain_layers():
    model = two_adapter_model()
    delete_adapter(model, "b")
    assert {n for n, _ in model.named_parameters() if "adapters.b" in n} == set()
    assert sum(isinstance(m, LoRALayer) for m in model.modules()) == 4  # q and v still carry "a"
    delete_adapter(model, "a")
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert set(tiny_llama().state_dict()) == set(model.state_dict())
    assert trainable_summary(model).methods == []


def test_deleting_the_active_adapter_activates_another_with_a_warning():
    model, inputs = two_adapter_model(), torch.randint(0, VOCAB, (1, 6))
    set_adapter(model, "a")
    with pytest.warns(UserWarning, match="adapter 'a' was active and is deleted; 'b' is active now"):
        delete_adapter(model, "a")
    with torch.no_grad():
        with_b = model(inputs).logits
        with disable_adapters(model):
            assert not torch.allclose(model(inputs).logits, with_b)  # b computes: not the base model


def test_deleting_the_active_adapter_activates_one_with_layers_of_its_method():
    from lightning_peft import BitFit

    model = tiny_bert()
    for method in (LoRA(r=2, target_modules=["query"], adapter_name="a"),
                   LoRA(r=2, target_modules=["query"], adapter_name="b"), BitFit(adapter_name="c")):
        method.inject(model)
    set_adapter(model, "a")
    with pytest.warns(UserWarning, match="'a' was active and is deleted; 'b' is active now"):
        delete_adapter(model, "a")
    assert all(layer.active_adapters == ["b"] for layer in model.modules() if isinstance(layer, LoRALayer))


def test_changing_adapters_of_a_merged_model_is_refused_as_merged(tmp_path):
    from lightning_peft import combine_adapters, hotswap_adapter, merge

    model = two_adapter_model()
    save_adapter(model, tmp_path, adapter_name="b")
    merge(model)
    for change in (lambda: delete_adapter(model, "a"), lambda: hotswap_adapter(model, tmp_path, adapter_name="b"),
                   lambda: combine_adapters(model, {"a": 1.0}, new_name="c"),
                   lambda: save_adapter(model, tmp_path / "merged", adapter_name="b")):  # was: a file of merged values
        with pytest.raises(ValueError, match="this model has merged adapters, which are in its weights now; unmerge"):
            change()
    assert not (tmp_path / "merged").exists()


def saved_adapter(tmp_path):
    model = tiny_llama()
    LoRA(r=4, target_modules=["q_proj"]).inject(model)
    save_adapter(model, tmp_path)
    return tmp_path


def assert_untouched(model, keys, flags):
    assert set(model.state_dict()) == keys
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:100]),
     ["adapter_model.safetensors", "not a valid safetensors file"]),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), ["adapter_config.json", "not valid JSON"]),
    (lambda d: (d / "adapter_config.json").unlink(), ["adapter_config.json", "does not exist"]),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps(
        {**json.loads((d / "adapter_config.json").read_text()), "r": 8})),
     ["lora_A.weight", "(4, 32)", "(8, 32)"]),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps(
        {**json.loads((d / "adapter_config.json").read_text()), "peft_type": "LOHA"})), ["LOHA", "not supported"]),
    *[(lambda d, option=option: (d / "adapter_config.json").write_text(json.dumps(
        {**json.loads((d / "adapter_config.json").read_text()), **option})),  # was: a missing tensor, or none
       [f"{next(iter(option))}={next(iter(option.values()))!r}", "not supported here"])
      for option in ({"bias": "all"}, {"lora_bias": True}, {"trainable_token_indices": [1, 2]},
                     {"layer_replication": [[0, 1]]}, {"use_qalora": True}, {"rank_pattern": {"q_proj": 2}},
                     {"ensure_weight_tying": True})],
])
def test_bad_adapter_files_name_the_problem_and_leave_the_model(tmp_path, damage, words):
    folder = saved_adapter(tmp_path)
    damage(folder)
    model = tiny_llama()
    keys, flags = set(model.state_dict()), [p.requires_grad for p in model.parameters()]
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_adapter(model, folder)
    for word in words:
        assert word in str(info.value)
    assert_untouched(model, keys, flags)


def test_a_method_that_cannot_adapt_the_file_s_layers_names_the_file(tmp_path):
    folder = saved_adapter(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["embed_tokens"],
                                                            "use_dora": True}))  # peft's DoRA on an embedding
    model = tiny_llama()
    keys, flags = set(model.state_dict()), [p.requires_grad for p in model.parameters()]
    with pytest.raises(TypeError, match=r"adapter file .*adapter_config.json: LoRA DoRA needs linear layers"):
        load_adapter(model, folder)
    assert_untouched(model, keys, flags)


def test_adapter_for_another_model_is_refused(tmp_path):
    folder = saved_adapter(tmp_path)
    model = tiny_gpt2()
    keys, flags = set(model.state_dict()), [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="matched no module"):
        load_adapter(model, folder)
    assert_untouched(model, keys, flags)


def test_a_failed_save_leaves_the_previous_files(tmp_path, monkeypatch):
    folder = saved_adapter(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model = tiny_llama()
    LoRA(r=4, target_modules=["q_proj"]).inject(model)
    randomize_trainable(model)

    import lightning_peft.core.adapter_files as adapter_files

    real_save_file = adapter_files.write_safetensors

    def fail_half_way(tensors, path, *args, **kwargs):
        """Write the real file, cut it in half where it was asked to go, then fail as a full disk would."""
        real_save_file(tensors, path, *args, **kwargs)
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(adapter_files, "write_safetensors", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary file left either


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert, tiny_gpt2])
def test_ia3_both_directions(build, tmp_path):
    from peft import IA3Config

    from lightning_peft import IA3

    base = build()
    ours = copy.deepcopy(base)
    IA3().inject(ours)  # the architecture's default targets
    randomize_trainable(ours, scale=0.5)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "IA3"
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert torch.allclose(logits(theirs), logits(ours), atol=1e-6)
    assert (last_hidden(base) - last_hidden(ours)).abs().max() > 1e-2  # the adapter matters

    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_model = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=config["target_modules"],
                                                                feedforward_modules=config["feedforward_modules"]))
    randomize_trainable(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert torch.allclose(logits(loaded), logits(peft_model), atol=1e-5)


@pytest.mark.parametrize("method", ["Adapter", "BitFit"])
def test_native_layout_round_trip_under_another_name(method, tmp_path):
    import lightning_peft

    base = tiny_bert()
    ours = copy.deepcopy(base)
    callback = getattr(lightning_peft, method)(**({"bottleneck_dim": 4} if method == "Adapter" else {}))
    callback.inject(ours)
    randomize_trainable(ours)
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lightning_peft_method"] == method

    again = load_adapter(copy.deepcopy(base), tmp_path, adapter_name="other")
    assert torch.allclose(last_hidden(again), last_hidden(ours), atol=1e-6)
    assert (last_hidden(again) - last_hidden(base)).abs().max() > 1e-2
    assert [r.method for r in trainable_summary(again).methods] == [f"{method}[other]"]


def test_equal_adapters_are_equal_files(tmp_path):
    """safetensors orders its metadata at random (a Rust HashMap): the header is written sorted."""
    from safetensors import safe_open

    model = tiny_llama()
    LoRA(r=4, target_modules=["q_proj"]).inject(model)
    files = set()
    for attempt in range(12):
        save_adapter(model, tmp_path / str(attempt))
        files.add((tmp_path / str(attempt) / "adapter_model.safetensors").read_bytes())
    assert len(files) == 1
    with safe_open(tmp_path / "0" / "adapter_model.safetensors", "pt") as f:
        assert set(f.metadata()) == {"format", "lightning_peft_sha256"}  # read back as a dict in any order


@pytest.mark.parametrize("method", [LoRA(r=4, dropout=0.3, target_modules=["q_proj", "v_proj"]),
                                    Adapter(bottleneck_dim=8, dropout=0.3)])
def test_an_adapter_loaded_into_a_model_in_eval_mode_runs_in_eval_mode(tmp_path, method):
    base = tiny_llama().eval()
    trained = method.inject(copy.deepcopy(base))
    with torch.no_grad():  # trained: the adapter changes the output
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    ids = torch.randint(0, VOCAB, (2, 8))
    expected = trained(ids).logits
    save_adapter(trained, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert not any(module.training for module in loaded.modules())  # no dropout at inference
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)
    training = load_adapter(copy.deepcopy(base).train(), tmp_path)
    assert all(module.training for module in training.modules())


def test_a_lora_file_saved_from_inside_an_ia3_wrapper_names_the_layer_itself(tmp_path):
    base = tiny_llama().eval()
    model = LoRA(r=4, target_modules=["k_proj"]).inject(copy.deepcopy(base))
    IA3(target_modules=["k_proj"], feedforward_modules=[]).inject(model)  # LoRA now sits at k_proj.base_layer
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    save_adapter(model, tmp_path, method="LoRA")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    delete_adapter(model, "default", "IA3")  # what the LoRA adapter alone computes
    ids = torch.randint(0, VOCAB, (2, 8))
    expected = model(ids).logits
    torch.testing.assert_close(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()(ids).logits, expected,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(load_adapter(copy.deepcopy(base), tmp_path)(ids).logits, expected, rtol=0, atol=1e-5)
    IA3(target_modules=["k_proj"], feedforward_modules=[]).inject(again := copy.deepcopy(base))
    load_adapter(again, tmp_path)  # into a model where IA3 wraps k_proj already


class PolicyAndReference(nn.Module):
    """Two transformers models side by side (a policy and its frozen reference, as in DPO)."""

    def __init__(self, base):
        super().__init__()
        self.model, self.ref_model = copy.deepcopy(base), copy.deepcopy(base)


def test_an_adapter_goes_into_the_first_of_two_models_and_one_on_both_is_refused_on_save(tmp_path):
    base = tiny_llama().eval()
    trained = LoRA(r=4, target_modules=["q_proj"]).inject(copy.deepcopy(base))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_()
    save_adapter(trained, tmp_path / "adapter")
    with pytest.warns(UserWarning, match=r"holds 2 transformers models \(model, ref_model\); the adapter goes into "
                                         r"the first, 'model'. To choose another, pass it itself \(module.ref_model"):
        both = load_adapter(PolicyAndReference(base), tmp_path / "adapter")
    ids = torch.randint(0, VOCAB, (2, 8))
    torch.testing.assert_close(both.model(ids).logits, trained(ids).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(both.ref_model(ids).logits, base(ids).logits, rtol=0, atol=1e-5)  # left out
    assert not any(p.requires_grad for p in both.ref_model.parameters())
    LoRA(r=4, target_modules=["q_proj"]).inject(everywhere := PolicyAndReference(base))
    with pytest.raises(ValueError, match=r"LoRA\[default\] trains 'ref_model\.model\.layers\.0\.self_attn\.q_proj\."
                                         r".*outside the transformers model 'model'"):
        save_adapter(everywhere, tmp_path / "both")


@pytest.mark.parametrize("method", ["Adapter", "BitFit"])
def test_a_native_file_saved_beside_another_methods_wrapper_loads_with_or_without_it(method, tmp_path):
    import lightning_peft

    base = tiny_bert()
    trained = copy.deepcopy(base)
    LoRA(r=4, target_modules=["query", "value"], adapter_name="lora").inject(trained)
    settings = {"bottleneck_dim": 4, "target_modules": ["attention.output.dense"]} if method == "Adapter" else {}
    getattr(lightning_peft, method)(adapter_name="native", **settings).inject(trained)
    IA3(target_modules=["attention.output.dense", "output.dense"], feedforward_modules=[],
        adapter_name="ia3").inject(trained)  # another wrapper around the Adapter's layers too
    randomize_trainable(trained)
    for name in ("lora", "native", "ia3"):
        save_adapter(trained, tmp_path / name, adapter_name=name)
    keys = load_file(tmp_path / "native" / "adapter_model.safetensors")
    assert keys and not any("base_layer" in key for key in keys)  # was: 'query.base_layer.bias', ...
    alone = load_adapter(copy.deepcopy(base), tmp_path / "native")  # was: "lacks tensor"
    only = copy.deepcopy(trained)
    set_adapter(only, "native")
    torch.testing.assert_close(last_hidden(alone), last_hidden(only), atol=1e-6, rtol=0)
    again = copy.deepcopy(base)
    for name in ("lora", "native", "ia3"):
        load_adapter(again, tmp_path / name, adapter_name=name)
    torch.testing.assert_close(last_hidden(again), last_hidden(trained), atol=1e-6, rtol=0)


def test_a_head_of_ones_own_beside_the_transformers_model_is_refused_with_advice_that_works(tmp_path):
    class BackboneAndHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = tiny_bert().bert, nn.Linear(32, 2)

    module = BackboneAndHead()
    with pytest.warns(UserWarning, match="'head' is a module of your own.*save_adapter will refuse it"):
        LoRA(r=4, target_modules=["query"], modules_to_save=["head"]).inject(module)  # said before training, too
    with pytest.raises(ValueError, match="'head' is a module of your own beside that model, which an adapter file"):
        save_adapter(module, tmp_path / "a")  # was: advice to save_adapter(module.head), which wrote a wrong file
    assert not (tmp_path / "a").exists()


def test_a_classifiers_class_names_travel_with_its_adapter(tmp_path):
    trained = tiny_bert()
    trained.config.id2label, trained.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"]).inject(trained)
    save_adapter(trained, tmp_path)
    loaded = load_adapter(tiny_bert(), tmp_path)
    assert loaded.config.id2label == {0: "neg", 1: "pos"}  # was: LABEL_0, LABEL_1, so predict printed 0 and 1
    named = tiny_bert()
    named.config.id2label = {0: "bad", 1: "good"}
    with pytest.warns(UserWarning, match="names its classes neg, pos, but the model names them bad, good"):
        assert load_adapter(named, tmp_path).config.id2label == {0: "bad", 1: "good"}
    LoRA(r=4, target_modules=["query"]).inject(unnamed := tiny_bert())
    save_adapter(unnamed, tmp_path / "unnamed")
    assert load_adapter(tiny_bert(), tmp_path / "unnamed").config.id2label == {0: "LABEL_0", 1: "LABEL_1"}


def test_predictions_take_the_class_names_of_the_model_when_the_task_has_none(tmp_path):
    from lightning_peft.tasks import SequenceClassification

    from conftest import tiny_bert_folder

    module = SequenceClassification(model=str(tiny_bert_folder(tmp_path, ["good", "bad"])))
    module.configure_model()
    module.model.config.id2label = {0: "neg", 1: "pos"}  # as an adapter file's names give it
    batch = {"input_ids": torch.tensor([[2, 5, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    predicted = module.predict_step(batch, 0)[0]
    assert predicted["label"] in ("neg", "pos") and set(predicted["probabilities"]) == {"neg", "pos"}


def test_a_folder_of_peft_s_several_adapters_names_them(tmp_path):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="first")
    peft_model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)  # adapters not named "default" each in a folder of its own
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds adapters in first, second: give one of those"):
        load_adapter(tiny_llama(), tmp_path)  # was: only "adapter_config.json does not exist"
    load_adapter(tiny_llama(), tmp_path / "second")
