"""Parameter-efficient fine-tuning: LoRA, adapters, prompt and prefix tuning, heads, selective tuning.

Every method is a small config applied with one call (see api.py):

    from gptlab.peft import apply_peft, LoraConfig, save_peft, load_peft
    apply_peft(model, LoraConfig(r=8, alpha=16))
"""

from gptlab.peft.adapter import Adapter, AdapterConfig, AdapterWrapper
from gptlab.peft.api import (active_adapter, apply_peft, base_fingerprint, delete_adapter, disable_adapters,
                             fold_prefix, format_report, list_adapters, load_peft, mark_trainable,
                             merge_and_unload, method_parameters, param_report, read_adapter, save_peft,
                             set_adapter, trainable_parameters)
from gptlab.peft.heads import SequenceClassifier, last_token_index
from gptlab.peft.lora import DEFAULT_TARGETS, LoraConfig, LoRALinear, merge_lora, unmerge_lora
from gptlab.peft.prefix import PrefixTuningConfig
from gptlab.peft.prompt import PromptTuningConfig, SoftPrompt
from gptlab.peft.select import SelectiveConfig, bitfit, embeddings_only, full, head_only, last_k_blocks

__all__ = [
    "Adapter", "AdapterConfig", "AdapterWrapper", "DEFAULT_TARGETS", "LoRALinear", "LoraConfig",
    "PrefixTuningConfig", "PromptTuningConfig", "SelectiveConfig", "SequenceClassifier", "SoftPrompt",
    "active_adapter", "apply_peft", "base_fingerprint", "bitfit", "delete_adapter", "disable_adapters",
    "embeddings_only", "fold_prefix", "format_report", "full", "head_only", "last_k_blocks",
    "last_token_index", "list_adapters", "load_peft", "mark_trainable", "merge_and_unload", "merge_lora",
    "method_parameters", "param_report", "read_adapter", "save_peft", "set_adapter", "trainable_parameters",
    "unmerge_lora",
]
