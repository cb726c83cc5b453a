"""Commands print what concerns the user's run only: no optional-library import noise, and
`export-lora` starts without the training stack."""

import subprocess
import sys
from pathlib import Path

import torch

from longcat_train.lora import LoraWeights, write_lora
from longcat_train.lora.formats import LoraModule


def test_export_lora_prints_nothing_to_stderr_and_does_not_load_peft(tmp_path: Path) -> None:
    source, target = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_lora(source, LoraWeights({"blocks.0.attn.qkv": LoraModule(torch.randn(4, 8), torch.randn(24, 4), 4.0)}),
               "comfyui", {"rank": 4})
    run = subprocess.run([sys.executable, "-m", "longcat_train.cli", "export-lora", str(source), str(target),
                          "--format", "official"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert target.is_file()
    probe = ("import sys; from longcat_train.cli import app; "
             f"app(['export-lora', {str(source)!r}, {str(tmp_path / 'again.safetensors')!r}, '--format', 'official'], "
             "standalone_mode=False); print('peft' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert loaded.stdout.strip().splitlines()[-1] == "False", loaded.stderr


def test_importing_the_training_stack_is_quiet() -> None:
    run = subprocess.run([sys.executable, "-c", "import longcat_train.training.loop, longcat_train.bench"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stderr == "", run.stderr
