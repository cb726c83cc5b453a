"""longcat-train: LoRA fine-tuning for LongCat-Video."""

import logging

__version__ = "0.1.0"

# Warnings that optional libraries log on import, on every command, about their own builds rather
# than the user's run: torchao's kernels compiled for other GPUs, its Enum registration that
# torch.compile deprecates, diffusers' hook for torchao-serialised checkpoints (PEFT imports torchao
# whenever it is installed). Dropped by message, so the libraries' other warnings still show.
_IMPORT_NOISE = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}


def _drop(prefixes: tuple[str, ...]):
    return lambda record: not any(p in str(record.msg) for p in prefixes)


for _name, _prefixes in _IMPORT_NOISE.items():
    logging.getLogger(_name).addFilter(_drop(_prefixes))
