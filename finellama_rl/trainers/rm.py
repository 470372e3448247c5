"""`trainer=rm`: train an outcome reward model that the `reward_model` reward source can use.

    python -m finellama_rl.launch experiment=fast trainer=rm run.dir=results/reward_models/fast-rm
    python -m finellama_rl.launch experiment=fast reward_model.path=results/reward_models/fast-rm

1. Labelled data (trainers/rm_data.py): the policy (`model`, with model.adapter if set)
   samples trainer.rm.samples_per_problem completions per training-split problem; corrupted
   copies and the references join them; the protocol's correctness scorer labels every one.
   Problems (not completions) are split into training and held-out parts. The data is
   cached in <run>/rm_data.jsonl, so a run stopped by a signal starts training again
   without sampling again (training itself is short and restarts from the start).
2. The reward model: `reward_model.model` as a sequence classifier with one logit, its base
   in 4-bit (trainer.quantization) with LoRA (trainer.lora) and a trainable head, trained with
   binary cross-entropy for trainer.max_steps steps of trainer.prompts_per_step examples
   (micro batches of trainer.micro_batch). It reads `rewards/reward_model.orm_text`, exactly
   what the reward source gives it when scoring.
3. Held-out accuracy, precision, recall, F1 and AUROC (and the majority-class baseline) go
   to <run>/rm_eval.json, every trainer.eval_every steps to metrics.jsonl (eval/rm_*), and
   the adapter, head, tokenizer and a manifest to <run>/reward_model/, which
   `reward_model.path=<run>` loads.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from finellama_rl.config import Config, Device
from finellama_rl.results import RunPaths
from finellama_rl.fileio import apply_umask, atomic_write_json
from finellama_rl.trainers.rm_data import (Example, balance, build_candidates, describe, label_examples,
                                           sample_completions, split_problems)
from finellama_rl.job.devices import free_memory

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------ data


def _data_key(cfg: Config) -> Dict[str, Any]:
    t, r = cfg.trainer, cfg.trainer.rm
    return {"model": cfg.model.name, "path": cfg.model.path, "adapter": cfg.model.adapter, "data": cfg.data.source.value,
            "protocol": cfg.eval.protocol.value, "rm": {k: getattr(r, k) for k in vars(r)}, "seed": t.seed,
            "max_completion_tokens": t.max_completion_tokens}


def _load_policy_for_sampling(cfg: Config):
    from peft import PeftModel

    from finellama_rl.job.model import load_base

    policy = load_base(cfg.model, cfg.trainer, cfg.hardware)
    if cfg.model.adapter:
        from finellama_rl.artifacts import resolve_adapter

        policy = PeftModel.from_pretrained(policy, str(resolve_adapter(cfg.model.adapter)), is_trainable=False)
    return policy.eval()


def labelled_data(cfg: Config, paths: RunPaths) -> Tuple[List[Example], List[Example]]:
    """(training, held-out) examples, from the cache when it was made with the same settings."""
    from finellama_rl.task.data import load_problems
    from finellama_rl.job.model import load_tokenizer

    cache, key = paths.rm_data, _data_key(cfg)
    if cache.is_file():
        lines = cache.read_text().splitlines()
        if lines and json.loads(lines[0]) == {"key": key}:
            rows = [Example(**json.loads(x)) for x in lines[1:]]
            return [e for e in rows if e.problem >= 0], [Example(**{**e.to_json(), "problem": -1 - e.problem}) for e in rows if e.problem < 0]
    r, seed = cfg.trainer.rm, cfg.trainer.seed
    problems = load_problems(cfg.data, "train")[: r.num_problems or None]
    tokenizer = load_tokenizer(cfg.model)
    policy = _load_policy_for_sampling(cfg)
    t0 = time.time()
    log.info("reward-model data: sampling %d completions of %d problems (progress: 'rm samples'), then labelling them",
             len(problems) * r.samples_per_problem, len(problems))
    samples = sample_completions(cfg, policy, tokenizer, problems)
    del policy
    free_memory(reset_peak=False)
    log.info("sampled %d completions of %d problems in %.0f s", sum(map(len, samples)), len(problems), time.time() - t0)
    candidates = build_candidates(problems, samples, cfg.eval.protocol, r.corrupted_per_problem, r.include_reference, seed)
    t0 = time.time()
    examples = label_examples(cfg.eval.protocol, candidates)
    log.info("labelled %d examples with the %s scorer in %.0f s", len(examples), cfg.eval.protocol.value, time.time() - t0)
    train_ids, held_ids = split_problems(len(problems), r.heldout_fraction, seed)
    held_set = set(held_ids)
    train = [e for e in examples if e.problem not in held_set]
    held = [e for e in examples if e.problem in held_set]
    if r.balance:
        train = balance(train, seed)
    # cache: held-out problems stored with negative ids so one file holds both parts
    body = [json.dumps({"key": key})] + [json.dumps(e.to_json()) for e in train]
    body += [json.dumps({**e.to_json(), "problem": -1 - e.problem}) for e in held]
    paths.rm_data.write_text("\n".join(body) + "\n")
    return train, held


# ----------------------------------------------------------------------------- model


def rm_base(cfg: Config):
    """The reward model's base: reward_model.model, else the policy's own model config."""
    return cfg.reward_model.model or cfg.model


def build_reward_model(cfg: Config):
    """(model, tokenizer): reward_model.model as a 1-logit sequence classifier; 4-bit + LoRA + head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finellama_rl.job.model import compute_dtype, disable_cpu_repack, _quantization_config, model_source

    m, t = rm_base(cfg), cfg.trainer
    source, dtype = model_source(m), compute_dtype(cfg.hardware)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    device = {"": 0} if cfg.hardware.device == Device.cuda else {"": "cpu"}
    quant = _quantization_config(t, dtype) if t.quantization.enabled else None
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype,
                                                               quantization_config=quant, device_map=device)
    model.config.pad_token_id = tokenizer.pad_token_id  # pooling: the last non-pad token
    if quant is not None:
        disable_cpu_repack(model)  # trainable after an eval-mode forward (see model.py)
        model.enable_input_require_grads()
    if t.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout, task_type="SEQ_CLS",
                          target_modules=list(t.lora.target_modules), modules_to_save=["score"], bias="none")
        model = get_peft_model(model, lora)
    for p in model.parameters():  # LoRA and head train in fp32 (Adam in bf16 stalls, FACTS)
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model, tokenizer


def _logits(model, tokenizer, examples: List[Example], max_tokens: int, device) -> torch.Tensor:
    from finellama_rl.rewards.frozen import encode
    from finellama_rl.rewards.reward_model import orm_text

    enc = encode(tokenizer, [orm_text(tokenizer, e.question, e.completion) for e in examples], max_tokens, device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(**enc).logits[:, 0].float()                                    # (b,)


@torch.no_grad()
def score_examples(model, tokenizer, examples: List[Example], cfg: Config) -> List[float]:
    """P(correct) for each example, in batches of reward_model.batch_size."""
    device, was = next(model.parameters()).device, model.training
    model.eval()
    out: List[float] = []
    for i in range(0, len(examples), cfg.reward_model.batch_size):
        out += torch.sigmoid(_logits(model, tokenizer, examples[i:i + cfg.reward_model.batch_size],
                                     cfg.reward_model.max_tokens, device)).tolist()
    model.train(was)
    return out


def heldout_metrics(model, tokenizer, held: List[Example], cfg: Config) -> Tuple[Dict[str, Any], List[float]]:
    from finellama_rl.eval.classification import binary_metrics

    scores = score_examples(model, tokenizer, held, cfg)
    return binary_metrics(scores, [e.label for e in held]), scores


# ------------------------------------------------------------------------------ loop


def _batches(train: List[Example], step: int, size: int, seed: int) -> List[Example]:
    """Examples of global step `step` (1-based): consecutive slices of per-epoch shuffles."""
    out, n = [], len(train)
    for pos in range((step - 1) * size, step * size):
        epoch = pos // n
        order = list(range(n))
        random.Random(seed + epoch).shuffle(order)
        out.append(train[order[pos % n]])
    return out


def train_steps(cfg: Config, model, tokenizer, train: List[Example], held: List[Example], monitor) -> Tuple[int, str]:
    """The optimisation loop; returns (last step, stop reason or "")."""
    from transformers import get_scheduler

    t = cfg.trainer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.lr_schedule.value, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    device, bce = next(model.parameters()).device, torch.nn.BCEWithLogitsLoss(reduction="sum")
    model.train()
    pending: List[Dict[str, float]] = []
    for step in range(1, t.max_steps + 1):
        batch = _batches(train, step, t.prompts_per_step, t.seed)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(batch), t.micro_batch):
            micro = batch[i:i + t.micro_batch]
            logits = _logits(model, tokenizer, micro, cfg.reward_model.max_tokens, device)
            labels = torch.tensor([float(e.label) for e in micro], device=device)
            loss = bce(logits, labels) / len(batch)
            loss.backward()
            loss_sum += loss.item()
            correct += int(((logits > 0).float() == labels).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
        pending.append({"train/loss": loss_sum, "train/accuracy": correct / len(batch), "train/grad_norm": float(grad_norm),
                        "train/learning_rate": scheduler.get_last_lr()[0]})
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        decision = monitor.decide(step)
        if step % t.log_every == 0 or step == t.max_steps or decision.stop or decision.evaluate:
            metrics = {k: sum(p[k] for p in pending) / len(pending) for k in pending[0]}
            if decision.evaluate:
                metrics.update({f"eval/rm_{k}": v for k, v in heldout_metrics(model, tokenizer, held, cfg)[0].items()
                                if isinstance(v, (int, float))})
            monitor.log(step, metrics, tokens=None)
            pending = []
        if decision.stop:
            return step, decision.reason
    return t.max_steps, ""


def save_reward_model(cfg: Config, paths: RunPaths, model, tokenizer, metrics: Dict[str, Any]) -> Path:
    from finellama_rl.rewards.reward_model import write_manifest

    folder = paths.reward_model
    tmp = folder.with_name(folder.name + ".staging")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, rm_base(cfg), metrics)  # last: its presence marks a complete folder
    apply_umask(tmp)  # safetensors leaves its weights 0600
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def is_done(paths: RunPaths) -> bool:
    from finellama_rl.artifacts import MANIFEST

    return (paths.reward_model / MANIFEST).is_file()


def run(cfg: Config, paths: RunPaths, monitor) -> bool:
    """The whole trainer=rm run (train.py calls it with the run's monitor); returns True when a
    stop request (signal, time limit) ended it early: run again to train from the cached data."""
    import transformers

    from finellama_rl.stats import write_training_stats

    if is_done(paths):
        print(f"reward model already trained: {paths.root}", flush=True)
        return False
    t0 = time.time()
    train, held = labelled_data(cfg, paths)
    log.info("reward-model data: training %s; held-out %s", describe(train), describe(held))
    if not train or len({e.label for e in train}) < 2:
        raise RuntimeError(f"the labelled training data has one class only ({describe(train)}): sample more "
                           "(trainer.rm.samples_per_problem, trainer.rm.num_problems) or add corrupted copies")
    transformers.set_seed(cfg.trainer.seed)
    model, tokenizer = build_reward_model(cfg)
    before, _ = heldout_metrics(model, tokenizer, held, cfg)
    step, reason = train_steps(cfg, model, tokenizer, train, held, monitor)
    write_training_stats(paths, cfg, time.time() - t0)
    if reason:
        print(f"stopped at step {step} ({reason}); run again to train again from the cached data: {paths.root}", flush=True)
        return True
    after, scores = heldout_metrics(model, tokenizer, held, cfg)
    folder = save_reward_model(cfg, paths, model, tokenizer, after)
    records = [{**e.to_json(), "score": s} for e, s in zip(held, scores)]
    atomic_write_json(paths.rm_eval, {
        "schema_version": 1, "kind": "finellama_rl/reward_model_eval", "run": cfg.run.name, "step": step,
        "reward_model": rm_base(cfg).name, "policy": cfg.model.name, "protocol": cfg.eval.protocol.value,
        "heldout": after, "before_training": before, "train_data": describe(train), "heldout_data": describe(held),
        "records": records})
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
    print(f"held-out ({after['n']} examples, {after['positives']} correct): accuracy {fmt(after['accuracy'])} "
          f"(before training {fmt(before['accuracy'])}, majority {fmt(after['majority_baseline'])}), precision "
          f"{fmt(after['precision'])}, recall {fmt(after['recall'])}, AUROC {fmt(after['auroc'])}", flush=True)
    print(f"reward model: {folder}  (use it with reward_model.path={paths.root})", flush=True)
    return False
