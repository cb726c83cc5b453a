"""A LoRA in memory: module name → (down, up, alpha), whatever file it came from or goes to."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraModule:
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change it makes, scale·up·down (fp32)."""
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class LoraWeights:
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @classmethod
    def from_peft_state(cls, state: dict[str, torch.Tensor], alpha: float) -> "LoraWeights":
        modules = {}
        for key, down in state.items():
            if key.endswith(".lora_A.weight"):
                name = key.removesuffix(".lora_A.weight")
                up = state[f"{name}.lora_B.weight"]
                modules[name] = LoraModule(down.detach().cpu().clone(), up.detach().cpu().clone(), float(alpha))
        return cls(modules)

    def to_peft_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, m in self.modules.items():
            state[f"{name}.lora_A.weight"] = m.down
            state[f"{name}.lora_B.weight"] = m.up
        return state
