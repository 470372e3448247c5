"""Starting a run from a trained LoRA adapter (`model.adapter=<run folder | checkpoint>`):
where the adapter is, and how it sits under the new trainable adapter.

    python -m finellama_rl.launch -m trainer=ppo,grpo model.adapter=results/<sweep>/sft-qwen2.5-3b-a100_80

Why this shape: RL after SFT needs the SFT policy as its starting point and as its
KL reference, on ONE 4-bit base (no second copy of the base in memory, and merging
the SFT adapter into 4-bit weights would round it away). So the SFT adapter is
loaded frozen under the name "sft", a fresh adapter "default" is added on top and
both are active (PEFT sums the deltas of active adapters: W x + B_d A_d x + B_s A_s x).
The new adapter starts with B = 0, so before the first update the policy equals
the SFT policy exactly. The reference is the policy with only the trainable
adapter switched off: `policy.disable_adapter()` (which our PPO and TRL's GRPO
call for their reference) is replaced on that one model by a context that keeps
the frozen adapter active, without touching requires_grad.

Checkpoints of such a run hold both adapters (PEFT writes the trainable one at the
top and the frozen one in `sft/`), so resume and the evaluate command need nothing
else. A run folder resolves to its final adapter: the best checkpoint when the run
restored one (SFT with trainer.sft.keep_best; best_checkpoint.json), else the latest.

Where the adapter is (a run folder or a checkpoint) is artifacts.py's part: the login node
checks it before submitting.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from finellama_rl import artifacts

FROZEN = artifacts.FROZEN  # the adapter we start from (frozen); its PEFT name and its folder in checkpoints
TRAINABLE = "default"  # PEFT's name for the adapter get_peft_model creates


# ----------------------------------------------------------------------- stacking (torch/peft below)


def stack_adapters(base, frozen_dir: Path, lora_config, trainable_dir: Optional[Path] = None):
    """PeftModel with the frozen adapter from `frozen_dir` and a trainable one on top
    (fresh from `lora_config`, or loaded from `trainable_dir`)."""
    from peft import PeftModel

    policy = PeftModel.from_pretrained(base, str(frozen_dir), adapter_name=FROZEN, is_trainable=False)
    if trainable_dir is not None:
        policy.load_adapter(str(trainable_dir), adapter_name=TRAINABLE, is_trainable=True)
    else:
        policy.add_adapter(TRAINABLE, lora_config)
    _no_dropout(policy, FROZEN)
    activate_stack(policy)
    policy.disable_adapter = types.MethodType(_frozen_only, policy)  # the reference: the frozen adapter's policy
    return policy


def is_stacked(policy) -> bool:
    return FROZEN in getattr(policy, "peft_config", {})


def activate_stack(policy) -> None:
    """Both adapters active (the trainable one first: the HF Trainer's resume reads
    `active_adapters[0]` as the one to train), the frozen one without gradients."""
    policy.base_model.set_adapter([TRAINABLE, FROZEN])  # makes both trainable ...
    policy.base_model.set_requires_grad(FROZEN, requires_grad=False)  # ... so freeze this one again
    policy.active_adapter = TRAINABLE


def _no_dropout(policy, name: str) -> None:
    """A frozen adapter is part of the fixed starting policy: no dropout on its input."""
    import torch

    for module in policy.modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, torch.nn.ModuleDict) and name in drop:
            drop[name] = torch.nn.Identity()


@contextmanager
def _frozen_only(policy):
    """Only the frozen adapter active (the KL reference); requires_grad untouched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in policy.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._active_adapter for m in layers]
    try:
        for m in layers:
            m._active_adapter = [FROZEN]
        yield
    finally:
        for m, active in zip(layers, saved):
            m._active_adapter = active


def after_trl_init(trainer) -> None:
    """Make a TRL trainer that was handed a stacked policy keep the stack.

    TRL's GRPOTrainer adds a "ref" copy of "default" as the reference when beta > 0
    and the model is already a PeftModel (trl/trainer/grpo_trainer.py, "create a
    'ref' adapter"), and switches to it with set_adapter, which deactivates the
    frozen adapter: we drop "ref" so TRL falls back to disable_adapter() (ours).
    The HF Trainer's resume calls set_adapter(active_adapters[0]) before building
    the optimizer (which then holds exactly the trainable adapter); a callback puts
    the frozen adapter back at the start of training.
    """
    from transformers import TrainerCallback

    model = trainer.model
    if not is_stacked(model):
        return
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
        activate_stack(model)

    class KeepStack(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            activate_stack(model)

    trainer.add_callback(KeepStack())


def load_adapter_weights(policy, folder: Path) -> None:
    """The trainable adapter's weights from a checkpoint folder into the live policy."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = str(next(policy.parameters()).device)
    result = set_peft_model_state_dict(policy, load_file(str(Path(folder) / artifacts.ADAPTER_FILE), device=device), adapter_name=TRAINABLE)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{folder}: adapter does not match the policy ({result.unexpected_keys[:3]})")
