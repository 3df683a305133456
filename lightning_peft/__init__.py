"""Parameter-efficient fine-tuning as Lightning callbacks."""

from lightning_peft.additive import IA3, Adapter, PrefixTuning, PromptTuning
from lightning_peft.core.adapter_control import adapter_names, delete_adapter, disable_adapters, set_adapter
from lightning_peft.core.adapter_files import save_adapter
from lightning_peft.core.merging import merge, unmerge
from lightning_peft.core.per_row import per_row_adapters
from lightning_peft.core.summary import trainable_summary
from lightning_peft.hotswap import hotswap_adapter
from lightning_peft.lightning.callback import PEFTCallback
from lightning_peft.lightning.host_memory import ReleaseFreedMemory
from lightning_peft.lightning.sharding import fsdp_auto_wrap_policy, full_adapter_state_dict, fully_shard_peft
from lightning_peft.lora import LoRA
from lightning_peft.lora.combine import combine_adapters
from lightning_peft.quantization import QuantizeBase
from lightning_peft.registry import load_adapter, register_method
from lightning_peft.selective import BitFit, Selective

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = ["IA3", "Adapter", "BitFit", "LoRA", "PEFTCallback", "PrefixTuning", "PromptTuning", "QuantizeBase",
           "ReleaseFreedMemory", "Selective", "adapter_names", "combine_adapters", "delete_adapter", "disable_adapters",
           "fsdp_auto_wrap_policy", "full_adapter_state_dict", "fully_shard_peft", "hotswap_adapter", "load_adapter",
           "merge", "per_row_adapters", "register_method", "save_adapter", "set_adapter", "trainable_summary",
           "unmerge"]
