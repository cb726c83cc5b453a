"""longcat-train: LoRA fine-tuning for LongCat-Video."""

__version__ = "0.1.0"
