"""The architecture matrix: every method on every family of tests/architectures.py, or one clear error saying why.

A cell that works must start as its base, train, and come back from its files (through peft where
peft has the layout); LoRA's trainable count must equal a count made here from the base model's own
shapes, every expert included. A cell that cannot work must raise the error listed in UNSUPPORTED,
on one line, before the model changes. The last test renders docs/models.md from these results.
"""

import copy
import os
from pathlib import Path

import pytest
import torch
from architectures import FAMILIES, Family
from peft import PeftModel
from torch import nn

from lightning_peft import (
    IA3,
    Adapter,
    BitFit,
    LoRA,
    PrefixTuning,
    PromptTuning,
    QuantizeBase,
    load_adapter,
    merge,
    save_adapter,
    trainable_summary,
)
from lightning_peft.core.layer import PEFTModule

R = 4
METHODS = ["LoRA", "IA3", "Adapter", "PromptTuning", "PrefixTuning", "BitFit", "QuantizeBase+LoRA"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
ENCODERS = ("bert", "roberta", "deberta_v2", "distilbert")
TORCH = ("mha", "convnet", "embedding_mlp")
MOE = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss")
# Cells whose file peft cannot load, and why: checked against our own loading only.
NO_PEFT_LOAD = {("mha", "LoRA"): "peft 0.21 saves no out_proj update of its nn.MultiheadAttention layer"}

NO_BIAS = "has 0 bias tensor(s)"
NO_PLACE = "found no block output projections"
# (family, method) -> words of the one-line error that says why the method cannot apply there.
UNSUPPORTED: dict[tuple[str, str], str] = {
    **{(name, "IA3"): "IA3 has no default targets for no transformers model" for name in TORCH},
    **{(name, "Adapter"): NO_PLACE for name in (*MOE, *TORCH)},
    **{(name, "PromptTuning"): "needs a transformers PreTrainedModel" for name in TORCH},
    **{(name, "PrefixTuning"): "needs a transformers PreTrainedModel" for name in TORCH},
    **{(name, "PrefixTuning"): "needs a model whose forward takes a key/value cache"
       for name in (*ENCODERS, "vit", "clip")},
    **{(name, "PrefixTuning"): "supports decoder-only models" for name in ("t5", "bart", "whisper")},
    ("vit", "PromptTuning"): "takes pixel_values first",
    ("whisper", "PromptTuning"): "takes input_features first",
    ("clip", "PromptTuning"): "has no single token embedding",
    **{(name, "BitFit"): NO_BIAS for name in ("llama", "mistral", "qwen3", "gemma", "gemma2", "phi3", "t5",
                                               "mixtral", "qwen3_moe", "olmoe")},
    **{(name, "QuantizeBase+LoRA"): "found no nn.Linear layer to quantize" for name in ("gpt2", "mha", "convnet")},
}

results: dict[tuple[str, str], str] = {}


def output(family: Family, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return family.output(model.eval()(**family.inputs())).float()


def train_a_few_steps(family: Family, model: nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        family.output(model(**family.inputs())).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def expected_lora_count(base: nn.Module, family: Family) -> int:
    """r * (in + out) for each adapted matrix, from the base model's own modules and shapes."""
    attention = {name for name, m in base.named_modules() if isinstance(m, nn.MultiheadAttention)}
    targets = family.lora_targets
    total = 0
    for name, module in base.named_modules():
        if set(name.split(".")) & family.heads or name.rpartition(".")[0] in attention and name.endswith("out_proj"):
            continue
        if targets != "all-linear" and name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, nn.MultiheadAttention):
            total += R * (module.embed_dim + 3 * module.embed_dim) + R * 2 * module.embed_dim
        elif isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            total += R * sum(module.weight.shape[:2])
        elif targets == "all-linear":
            continue
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            total += R * module.weight[0].numel() + R * module.out_channels
        elif isinstance(module, nn.Embedding):
            total += R * (module.num_embeddings + module.embedding_dim)
    experts = [p for name, p in base.named_parameters() if p.dim() == 3 and ".experts." in name]
    return total + sum(R * p.shape[0] * (p.shape[1] + p.shape[2]) for p in experts)


def moved(after: torch.Tensor, before: torch.Tensor) -> bool:
    """Whether training changed an output by more than a ten-thousandth of its size (float noise is far below)."""
    return bool((after - before).abs().max() > 1e-4 * before.abs().max())


def round_trip(family: Family, method: str, base: nn.Module, model: nn.Module, folder: Path,
               expected: torch.Tensor) -> None:
    """The saved adapter gives the same output loaded by us, and by peft where peft has the method and layout."""
    save_adapter(model, folder)
    assert torch.allclose(output(family, load_adapter(copy.deepcopy(base), folder)), expected, atol=1e-5)
    config = (folder / "adapter_config.json").read_text()
    if '"peft_type"' in config and (family.name, method) not in NO_PEFT_LOAD:
        theirs = output(family, PeftModel.from_pretrained(copy.deepcopy(base), folder))
        if theirs.dim() > 1 and theirs.shape[1] > expected.shape[1]:  # peft's causal LMs keep the prompt's positions
            theirs = theirs[:, -expected.shape[1]:]
        assert torch.allclose(theirs, expected, atol=1e-5)


def callbacks(family: Family, method: str) -> list:
    """The callbacks that make one cell's method, in the order they inject."""
    lora = LoRA(r=R, alpha=8, target_modules=family.lora_targets)
    return {"LoRA": [lora], "QuantizeBase+LoRA": [QuantizeBase("nf4"), lora], "IA3": [IA3()],
            "Adapter": [Adapter(bottleneck_dim=8)], "PromptTuning": [PromptTuning(num_virtual_tokens=4)],
            "PrefixTuning": [PrefixTuning(num_virtual_tokens=4)], "BitFit": [BitFit()]}[method]


def check_cell(family: Family, method: str, base: nn.Module, folder: Path) -> None:
    """Inject into a copy: it starts as the base (as the quantized base; soft prompts add at once), trains,
    comes back from its files, and merges where the method merges; LoRA trains the counted parameters."""
    model = copy.deepcopy(base)
    *storage, peft_method = callbacks(family, method)
    for callback in storage:
        callback.inject(model)
    start = output(family, model)
    peft_method.inject(model)
    if isinstance(peft_method, LoRA):
        assert trainable_summary(model).trainable == expected_lora_count(base, family)
    if not isinstance(peft_method, (PromptTuning, PrefixTuning)):
        assert torch.allclose(output(family, model), start, atol=1e-6, rtol=0)
    before = output(family, model)
    train_a_few_steps(family, model)
    trained = output(family, model)
    assert moved(trained, before)
    if storage:
        return
    round_trip(family, method, base, model, folder, trained)
    if isinstance(peft_method, (LoRA, IA3)):
        merge(model)
        assert not any(isinstance(m, PEFTModule) for m in model.modules())
        assert torch.allclose(output(family, model), trained, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:.*leaves out:UserWarning", "ignore:QuantizeBase keeps:UserWarning",
                            "ignore:.*saved in lightning-peft's own layout:UserWarning")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_matrix(family: Family, method: str, tmp_path: Path) -> None:
    base = family.build().eval()
    reason = UNSUPPORTED.get((family.name, method))
    if reason is None:
        check_cell(family, method, base, tmp_path)
        results[family.name, method] = "yes"
        return
    keys = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises((ValueError, TypeError)) as info:
        for callback in callbacks(family, method):
            callback.inject(base)
    message = str(info.value)
    assert reason in message and "\n" not in message, message
    assert not any(isinstance(m, PEFTModule) for m in base.modules())
    after = base.state_dict()
    assert after.keys() == keys.keys() and all(torch.equal(after[k], v) for k, v in keys.items())
    results[family.name, method] = message


def render(outcomes: dict[tuple[str, str], str]) -> str:
    """docs/models.md: the architecture x method table, each "no" with the error the user gets."""
    notes: dict[str, int] = {}
    rows = []
    for family in FAMILIES:
        cells = []
        for method in METHODS:
            outcome = outcomes[family.name, method]
            if outcome == "yes":
                cells.append("yes")
            else:
                cells.append(f"no [{notes.setdefault(outcome, len(notes) + 1)}]")
        rows.append(f"| {family.name} | {family.kind} | " + " | ".join(cells) + " |")
    return "\n".join([
        "# Supported models",
        "",
        "<!-- Written by tests/test_architectures.py from its results; do not edit by hand. To rewrite it: -->",
        "<!-- LIGHTNING_PEFT_WRITE_DOCS=1 python -m pytest tests/test_architectures.py -->",
        "",
        "Each row is a tiny, randomly initialised model built from its transformers config (or a plain torch",
        "module), each column a method with its defaults (LoRA: `target_modules=\"all-linear\"`, r=4; the conv and",
        "embedding models name their layers). **yes**: the suite injects it, checks that the model starts as its",
        "base, trains it a few steps, saves the adapter and loads it back (also through peft where peft reads the",
        "layout), and merges it where the method merges; LoRA's trainable count equals a count made from the base",
        "model's shapes, every expert of the mixture-of-experts models included. **no [n]**: the method refuses",
        "before anything changes, with the one-line error below.",
        "",
        "| family | kind | " + " | ".join(METHODS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in METHODS) + " |",
        *rows,
        "",
        "Why not:",
        "",
        *[f"{n}. {message}" for message, n in notes.items()],
        "",
    ])


def test_the_models_page_is_the_matrix() -> None:
    if len(results) < len(FAMILIES) * len(METHODS):
        pytest.skip("the whole matrix did not run in this session (a -k or -x selection)")
    page = render(results)
    if os.environ.get("LIGHTNING_PEFT_WRITE_DOCS"):
        DOCS.write_text(page)
    assert DOCS.read_text() == page, ("docs/models.md differs from the matrix's results; rewrite it with "
                                      "LIGHTNING_PEFT_WRITE_DOCS=1 python -m pytest tests/test_architectures.py")
