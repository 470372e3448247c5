"""The plain-TRL side of benchmarks/gpu_check.py's overhead comparison: GRPO as a user
writes it with TRL alone (model path, BitsAndBytesConfig, peft LoraConfig, GRPOConfig,
GRPOTrainer), with every setting taken from the same finellama_rl config, so that the
step-time ratio measures what finellama_rl adds (fp32 adapters, phase tracking, host
snapshots after every step, metrics and checkpoint callbacks, explicit decoding).

No checkpoints are saved (finellama_rl saves one at the last step; it is outside the
steps that are timed). Step times are the intervals between consecutive step ends.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List


def _timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Peak memory from the start of training (the model is loaded by then) and the
        wall time between step ends (synchronized, so a step's GPU work is in its interval)."""

        def __init__(self):
            self.ends: List[float] = []
            self.start = 0.0

        def on_train_begin(self, args, state, control, **kw):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def step_seconds(self) -> List[float]:
            marks = [self.start, *self.ends]
            return [round(b - a, 4) for a, b in zip(marks, marks[1:])]

    return StepTimer()


def plain_trl_grpo(cfg, rows: List[Dict[str, str]], reward_funcs, output_dir: Path) -> Dict[str, Any]:
    """Train cfg.trainer.max_steps GRPO steps with TRL alone; step seconds and peak memory."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl import GRPOConfig, GRPOTrainer

    t, hw = cfg.trainer, cfg.hardware
    on_gpu = hw.device.value == "cuda"
    dtype = torch.bfloat16 if on_gpu and hw.bf16 else torch.float32
    dtype_name = str(dtype).replace("torch.", "")  # a string: GRPOConfig is serialized to JSON
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    args = GRPOConfig(
        output_dir=str(output_dir), use_cpu=not on_gpu, bf16=on_gpu and hw.bf16, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_schedule.value, max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.micro_batch, gradient_accumulation_steps=t.grad_accum,
        num_generations=t.num_generations, max_completion_length=t.max_completion_tokens,
        temperature=t.temperature, top_p=t.top_p, beta=t.beta, epsilon=t.clip_epsilon, loss_type=t.loss_type.value,
        max_steps=t.max_steps, seed=t.seed, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0,
        model_init_kwargs={"dtype": dtype_name, "attn_implementation": "sdpa", "device_map": {"": 0} if on_gpu else "cpu"},
    )
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=t.quantization.quant_type.value,
        bnb_4bit_use_double_quant=t.quantization.double_quant, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    lora = LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                      target_modules=list(t.lora.target_modules), task_type="CAUSAL_LM", bias="none")
    timer = _timer_callback()
    trainer = GRPOTrainer(model=str(cfg.model.path), reward_funcs=list(reward_funcs), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, quantization_config=quant,
                          peft_config=lora, callbacks=[timer])
    if not on_gpu:  # the bitsandbytes CPU repack trap (FACTS.md): same switch as finellama_rl.job.model
        from finellama_rl.job.model import disable_cpu_repack

        disable_cpu_repack(trainer.model)
    trainer.train()
    out = {"sec_per_step": timer.step_seconds(), "steps": trainer.state.global_step,
           "adapter_dtype": str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad)).replace("torch.", "")}
    if on_gpu:
        out["allocated_gib"] = round(torch.cuda.max_memory_allocated() / 1024 ** 3, 3)
        out["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 1024 ** 3, 3)
    del trainer
    return out
