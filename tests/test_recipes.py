"""Every YAML recipe still builds through the CLI, with the method its name promises.

A renamed argument or a moved class would otherwise surface only when a user runs the recipe.
"""

from pathlib import Path

import pytest

from lightning_peft import IA3, Adapter, BitFit, LoRA, PrefixTuning, PromptTuning, QuantizeBase, Selective
from lightning_peft.cli import build_cli
from lightning_peft.lightning.callback import PEFTCallback

RECIPES = Path(__file__).parent.parent / "recipes"
METHODS = {  # recipe name -> the PEFT callbacks it must configure, in order
    "full_finetune_sentiment": [],
    "head_only_sentiment": [Selective],
    "lora_sentiment": [LoRA],
    "lora_multitask_sentiment": [LoRA] * 4,
    "bitfit_sentiment": [BitFit],
    "ia3_sentiment": [IA3],
    "adapter_sentiment": [Adapter],
    "prompt_tuning_sentiment": [PromptTuning],
    "lora_causal_lm": [LoRA],
    "qlora_causal_lm": [QuantizeBase, LoRA],
    "prefix_tuning_causal_lm": [PrefixTuning],
}


def test_every_recipe_is_listed():
    assert sorted(path.stem for path in RECIPES.glob("*.yaml")) == sorted(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_recipe_builds_with_its_method(name, tmp_path):
    cli = build_cli(["--config", str(RECIPES / f"{name}.yaml"), f"--trainer.default_root_dir={tmp_path}"], run=False)
    methods = [type(callback) for callback in cli.trainer.callbacks
               if isinstance(callback, (PEFTCallback, QuantizeBase))]
    assert methods == METHODS[name]
    assert cli.model.hparams.learning_rate > 0
    assert cli.trainer.max_steps > 0
