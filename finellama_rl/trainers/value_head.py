"""PPO's critic on the policy's own (4-bit) base, and the forward pass both share.

Why: one 4-bit base holds the policy (LoRA "default"), the critic and the
reference (the same base with adapters disabled), so PPO fits where GRPO fits.
Two critic layouts, chosen by `trainer.ppo.value_head`:

* shared  - a linear head (hidden -> 1, fp32, zero-init) on the policy's last
  hidden state: one forward gives logits and values; value-loss gradients also
  train the policy's LoRA (a shared trunk, balanced by ppo.vf_coef).
* adapter - a second LoRA adapter "value" on the same base with its own linear
  head: a second forward (and backward) per micro batch, no shared trunk.

`forward_completion` runs the decoder once and applies the LM head only to the
completion positions (the logits of the prompt positions are never built),
which is what `output_hidden_states=True` plus slicing would give, for less
memory. Used by finellama_rl/trainers/ppo.py and ppo_rollout.py.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from finellama_rl.config import TrainerConfig, ValueHead
from finellama_rl.errors import ConfigError

POLICY_ADAPTER = "default"  # PEFT's name for the adapter get_peft_model creates
VALUE_ADAPTER = "value"


def unwrap(model):
    """The transformers CausalLM under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def model_device(model) -> torch.device:
    return unwrap(model).get_input_embeddings().weight.device


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as HF generate computes them: (B, L)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def forward_completion(model, batch: Dict[str, Tensor], temperature: float, logits: bool = True
                       ) -> Tuple[Optional[Tensor], Tensor]:
    """(logits (B, T, V) fp32 scaled by 1/temperature, hidden (B, T, H)) for the T completion tokens.

    `batch` has input_ids / attention_mask (B, L = prompt + T) and completion (B, T).
    The state at position j predicts token j + 1, so completion token t is scored
    (and valued) from the hidden state at L - T - 1 + t. logits=False skips the LM
    head (the value adapter's pass: (B, T, V) is the largest tensor of a step).
    """
    base = unwrap(model)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    T = batch["completion"].shape[1]
    out = base.get_decoder()(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False)
    hidden = out.last_hidden_state[:, -T - 1:-1]                        # (B, T, H)
    if not logits:
        return None, hidden
    logits = base.get_output_embeddings()(hidden).float()                  # (B, T, V) fp32
    return (logits if temperature == 1.0 else logits / temperature), hidden  # x / 1.0 == x: skip a (B, T, V) pass


class LinearValueHead(nn.Module):
    """hidden (B, T, H) in any dtype -> values (B, T) fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.linear.weight)  # V = 0 at start: the first advantages are the rewards
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # fp32 even under bf16 autocast
            return self.linear(hidden.float()).squeeze(-1)


class Critic:
    """The value function: a head, and for `adapter` its own LoRA on the shared base."""

    def __init__(self, policy, trainer: TrainerConfig):
        self.mode = trainer.ppo.value_head
        if self.mode not in (ValueHead.shared, ValueHead.adapter):
            raise ConfigError("trainer.ppo.value_head", f"unknown value head {self.mode!r}: expected shared|adapter")
        if self.mode == ValueHead.adapter:
            if not is_peft(policy):
                raise ConfigError("trainer.ppo.value_head", "adapter needs trainer.lora.enabled=true; use shared for full fine-tuning")
            from finellama_rl.job.model import lora_config

            policy.add_adapter(VALUE_ADAPTER, lora_config(trainer))
            policy.base_model.set_adapter(POLICY_ADAPTER)
        tags = (f".{POLICY_ADAPTER}.", f".{VALUE_ADAPTER}.")
        self._lora = [p for n, p in policy.named_parameters() if "lora_" in n and any(t in n for t in tags)]
        hidden_size = unwrap(policy).config.hidden_size
        self.head = LinearValueHead(hidden_size).to(model_device(policy))

    @property
    def separate(self) -> bool:
        """True when values need their own forward (and may take their own backward)."""
        return self.mode == ValueHead.adapter

    def values(self, policy, batch: Dict[str, Tensor], policy_hidden: Optional[Tensor]) -> Tensor:
        """(B, T) fp32 values; `shared` reuses the policy forward's hidden states."""
        if not self.separate:
            return self.head(policy_hidden)
        self._activate(policy, VALUE_ADAPTER)
        try:
            _, hidden = forward_completion(policy, batch, 1.0, logits=False)
        finally:
            self._activate(policy, POLICY_ADAPTER)
        return self.head(hidden)

    def _activate(self, policy, name: str) -> None:
        """Switch the active adapter, keeping both adapters' requires_grad on.

        Correctness trap: PEFT's set_adapter sets requires_grad=False on the inactive
        adapter, and autograd drops the gradient of a leaf whose requires_grad is off
        at backward time, so switching back before the value loss's backward would
        silently freeze the value adapter. An inactive adapter gets no gradient anyway.
        """
        policy.base_model.set_adapter(name)
        for p in self._lora:
            p.requires_grad_(True)

    def trainable_parameters(self, policy) -> List[nn.Parameter]:
        """What the policy trains (LoRA, or all weights when LoRA is off), the value adapter
        and the head, in model order. Call once, with the policy adapter active: PEFT flips
        requires_grad when it switches or disables adapters, so the list is kept, not
        recomputed, and its order (which the optimizer state depends on) survives resume.
        """
        value_tag = f".{VALUE_ADAPTER}."
        params = [p for n, p in policy.named_parameters() if p.requires_grad or (self.separate and value_tag in n)]
        return params + list(self.head.parameters())


def disable_dropout(model) -> int:
    """p=0 on every dropout layer, so that the update's log-probs equal the rollout's
    before the first optimizer step (ratio 1) while the model stays in train mode."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
            n += 1
    return n
