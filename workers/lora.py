"""LoRA adapters (peft) on the policy: what the trainer needs beyond a plain model.

Only the adapters train. The rollouts, `policy/` in checkpoints and the next stage get the merged
weights under the base model's own names (`merged_state_dict`); checkpoints also hold the adapters
alone (`policy_adapter/`), from which a resume continues. The frozen base (adapters off) is the
reference policy, so no second copy of the weights is needed. A PPO critic with LoRA trains its
adapters and its value head (`apply_lora(..., "TOKEN_CLS")`); its checkpoint holds just those.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from orchestrator.core.spec import LoraSpec

ADAPTER_DIR = "policy_adapter"


def apply_lora(model: torch.nn.Module, spec: LoraSpec, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """The model with adapters on `spec.target_modules`; every base weight frozen (but a `TOKEN_CLS`
    model's head, which peft trains whole: the critic's value head is new)."""
    from peft import LoraConfig, get_peft_model

    head = {"exclude_modules": ["score", "classifier"]} if task_type != "CAUSAL_LM" else {}  # (trained whole, not adapted)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, task_type=task_type, **head,
                        target_modules=spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules))
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. a target module the model does not have
        from workers.common import ModelLoadError

        raise ModelLoadError(f"model.lora.target_modules={spec.target_modules!r}: {err}") from None


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict, by its own (HF) names, with each adapter's (alpha / r) B A added
    to its weight. The model is not changed (no merge and unmerge in place)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    key = f"{name}.weight"
                    delta = module.get_delta_weight(adapter)
                    deltas[key] = deltas[key] + delta if key in deltas else delta
    out = {}
    for key, tensor in base.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        out[key] = (tensor + deltas[key].to(tensor.dtype)) if key in deltas else tensor
    return out


def save_adapter(model: torch.nn.Module, out: Path) -> None:
    model.save_pretrained(out / ADAPTER_DIR)


def load_adapter(model: torch.nn.Module, src: Path) -> None:
    """The adapter weights `save_adapter` wrote into `src/policy_adapter/`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(src / ADAPTER_DIR / "adapter_model.safetensors"))
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint {src / ADAPTER_DIR} does not match the model's adapters: unexpected {result.unexpected_keys}")
