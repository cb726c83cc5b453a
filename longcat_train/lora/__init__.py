"""LoRA on the LongCat-Video transformer: PEFT adapters for training, files in the formats of
`formats.LORA_FORMATS`, and forward-hook application of any number of LoRAs for renders."""

from .adapters import DEFAULT_TARGETS, add_lora, lora_state
from .apply import apply_loras
from .formats import FORMATS, LoraFile, LoraWeights, read_lora, write_lora

__all__ = [
    "DEFAULT_TARGETS",
    "FORMATS",
    "LoraFile",
    "LoraWeights",
    "add_lora",
    "apply_loras",
    "lora_state",
    "read_lora",
    "write_lora",
]
