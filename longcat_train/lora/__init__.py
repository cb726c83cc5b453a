"""LoRA on the LongCat-Video transformer: files in the formats of `formats.LORA_FORMATS` and
forward-hook application of any number of LoRAs for renders, importable without PEFT (so
`export-lora` and renders start fast); the PEFT adapters that training attaches are in
`lora.adapters`."""

from .apply import apply_loras
from .formats import FORMATS, LoraFile, read_lora, write_lora
from .weights import LoraModule, LoraWeights

__all__ = ["FORMATS", "LoraFile", "LoraModule", "LoraWeights", "apply_loras", "read_lora", "write_lora"]
