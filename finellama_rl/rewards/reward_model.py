"""The `reward_model` reward source: a frozen model that scores a completion in [0, 1].

Two kinds (reward_model.kind):
- orm, an outcome reward model: sequence classification of the chat
  [user: question, assistant: completion] (`orm_text`), one logit (sigmoid) or two classes
  (softmax, class 1 = correct). A `trainer=rm` run folder (trainers/rm.py: base + LoRA +
  head) or any sequence-classification model folder.
- prm, a process reward model in the public Qwen2.5-Math-PRM format: the completion is split
  into steps at reward_model.step_separator, the steps are joined with `<extra_0>` after a
  system prompt and the question (`prm_text`), the model gives two-class logits per token,
  and a step's score is P(class 1) at its `<extra_0>`; the reward is the min, last or mean
  of the step scores (reward_model.aggregation). Checkpoints with their own code
  (Qwen/Qwen2.5-Math-PRM-7B) load with reward_model.trust_remote_code=true; a token
  classification model with 2 labels has the same outputs (tests build a tiny one).

Loaded in 4-bit, 8-bit, bf16 or fp32 (reward_model.quantization), on the policy's GPU or
reward_model.gpu, scored in batches of reward_model.batch_size under no_grad.

    scorer = load_reward_model(cfg.reward_model, cfg.hardware, "cuda:1")
    scorer.score(questions, completions, references)   # -> [0.93, 0.08, ...]
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from finellama_rl.config import HardwareConfig, ModelConfig, RewardModelConfig, RewardModelKind, StepAggregation
from finellama_rl.errors import ConfigError
from finellama_rl.artifacts import MANIFEST, ORM_FORMAT, RewardModelSource, describe_source
from finellama_rl.job.model import model_source
from finellama_rl.rewards.frozen import FrozenScorer, batches, encode, freeze, load_kwargs

log = logging.getLogger(__name__)

PRM_STEP_TOKEN = "<extra_0>"
PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def orm_text(tokenizer, question: str, completion: str) -> str:
    """What an outcome reward model reads (trainer=rm trains on exactly this)."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": completion}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return f"Question: {question}\nAnswer: {completion}\n"


def split_steps(completion: str, separator: str) -> List[str]:
    """The completion's non-empty steps (the whole text is one step when it has no separator)."""
    steps = [s.strip() for s in completion.split(separator)]
    return [s for s in steps if s] or [completion.strip() or "(empty)"]


def prm_text(tokenizer, question: str, completion: str, separator: str) -> str:
    """The Qwen2.5-Math-PRM input: system, question, steps each followed by <extra_0>."""
    steps = split_steps(completion, separator)
    messages = [{"role": "system", "content": PRM_SYSTEM}, {"role": "user", "content": question},
                {"role": "assistant", "content": PRM_STEP_TOKEN.join(steps) + PRM_STEP_TOKEN}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def aggregate(step_scores: Sequence[float], how: StepAggregation) -> float:
    """One reward from per-step scores; no step (a fully truncated input) scores 0."""
    if not step_scores:
        return 0.0
    how = StepAggregation(how)
    if how == StepAggregation.min:
        return float(min(step_scores))
    if how == StepAggregation.last:
        return float(step_scores[-1])
    if how == StepAggregation.mean:
        return float(sum(step_scores) / len(step_scores))
    raise ValueError(f"unknown aggregation {how!r}: expected min|last|mean")


def base_source(src: RewardModelSource) -> str:
    """Where the reward model's base weights come from (a trainer=rm run names its base model)."""
    return model_source(src.base_model) if src.kind == "run" else src.weights


def _load_model(rm: RewardModelConfig, src: RewardModelSource, hardware: HardwareConfig, device: str):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    kwargs = load_kwargs(rm.quantization, hardware, device)
    if rm.kind == RewardModelKind.prm:
        if rm.trust_remote_code:  # Qwen2.5-Math-PRM ships Qwen2ForProcessRewardModel as remote code
            return AutoModel.from_pretrained(base_source(src), trust_remote_code=True, **kwargs)
        return AutoModelForTokenClassification.from_pretrained(base_source(src), **kwargs)
    if src.kind != "run":
        return AutoModelForSequenceClassification.from_pretrained(base_source(src), **kwargs)
    if not (Path(src.adapter) / "adapter_config.json").is_file():  # trained without LoRA: the whole model is there
        return AutoModelForSequenceClassification.from_pretrained(src.adapter, **kwargs)
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(base_source(src), num_labels=1, **kwargs)
    return PeftModel.from_pretrained(base, src.adapter, is_trainable=False)


def load_reward_model(rm: RewardModelConfig, hardware: HardwareConfig, device: str) -> "RewardModelScorer":
    from transformers import AutoTokenizer

    src = describe_source(rm)
    tok_source = src.adapter if src.kind == "run" and (Path(src.adapter) / "tokenizer_config.json").is_file() else base_source(src)
    tokenizer = AutoTokenizer.from_pretrained(tok_source, trust_remote_code=rm.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = freeze(_load_model(rm, src, hardware, device))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id  # sequence classification pools the last non-pad token
    log.info("reward model %s (%s, %s) loaded from %s", rm.kind.value, src.kind, rm.quantization.value, rm.path)
    return RewardModelScorer(model, tokenizer, device, rm, f"{rm.kind.value} {rm.path} ({rm.quantization.value})")


# ------------------------------------------------------------------------------ scoring


def _orm_probability(logits):
    """(B, 1) -> sigmoid; (B, 2) -> P(class 1)."""
    import torch

    logits = logits.float()
    return torch.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else torch.softmax(logits, -1)[:, 1]


def step_scores(logits, input_ids, step_token_id: int) -> List[List[float]]:
    """P(class 1) at every step-separator token, per sequence: logits (B, L, 2), ids (B, L)."""
    import torch

    probs = torch.softmax(logits.float(), -1)[..., 1]          # (B, L)
    marks = input_ids == step_token_id                          # (B, L)
    return [probs[i][marks[i]].tolist() for i in range(input_ids.shape[0])]


class RewardModelScorer(FrozenScorer):
    def __init__(self, model, tokenizer, device: str, rm: RewardModelConfig, description: str):
        super().__init__(model, tokenizer, device)
        self.rm = rm
        self.description = description
        if rm.kind == RewardModelKind.prm:
            ids = tokenizer.encode(PRM_STEP_TOKEN, add_special_tokens=False)
            if len(ids) != 1:
                raise ConfigError("reward_model.path", f"{rm.path}: its tokenizer has no single {PRM_STEP_TOKEN} token; "
                                                       "not a Qwen2.5-Math-PRM-format model (reward_model.kind=orm?)")
            self.step_token_id = ids[0]

    def texts(self, questions: Sequence[str], completions: Sequence[str]) -> List[str]:
        if self.rm.kind == RewardModelKind.prm:
            return [prm_text(self.tokenizer, q, c, self.rm.step_separator) for q, c in zip(questions, completions)]
        return [orm_text(self.tokenizer, q, c) for q, c in zip(questions, completions)]

    def score(self, questions: Sequence[str], completions: Sequence[str],
              references: Optional[Sequence[str]] = None) -> List[float]:
        """Rewards in [0, 1] (references are not shown to a reward model)."""
        import torch

        texts, out = self.texts(questions, completions), []
        for start, end in batches(len(texts), self.rm.batch_size):
            enc = encode(self.tokenizer, texts[start:end], self.rm.max_tokens, self.device)
            with torch.no_grad():
                result = self.model(**enc)
            logits = result.logits if hasattr(result, "logits") else result[0]   # orm (b, labels), prm (b, L, 2)
            if self.rm.kind == RewardModelKind.prm:
                out += [aggregate(s, self.rm.aggregation) for s in step_scores(logits, enc["input_ids"], self.step_token_id)]
            else:
                out += _orm_probability(logits).tolist()
        return out


def write_manifest(folder: Path, base_model: ModelConfig, metrics: Dict[str, Any]) -> Path:
    """The manifest trainers/rm.py writes next to the adapter so describe_source can load it."""
    data = {"orm_format": ORM_FORMAT, "kind": "orm", "num_labels": 1,
            "base_model": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(base_model).items()},
            "heldout": metrics}
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(data, indent=2))
    return path
