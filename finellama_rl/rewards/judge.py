"""The `judge` reward source: a frozen instruction model reads the question, the completion
and (judge.use_reference) the reference solution through one fixed prompt and answers
CORRECT or INCORRECT; the reward is 1 for CORRECT, else 0.

Robust by design: the verdict is parsed from whatever the judge writes (`parse_verdict`:
case, punctuation, markdown and a short preamble are tolerated). Output that names no
verdict, or both, is *malformed*: it scores 0, is counted, and is reported per step as
`train/judge_malformed_frac`; it never stops training.

The judge's decoding is set explicitly (greedy, no repetition penalty): Qwen2.5-Instruct
ships generation defaults (temperature 0.7, repetition_penalty 1.05) that transformers
would otherwise apply. A completion too long for judge.max_input_tokens keeps its end
(where the final answer is) and loses its start; the instructions are never cut.

Loaded in bf16 or 8-bit (judge.quantization; also nf4/fp32), on the policy's GPU or judge.gpu.

    scorer = load_judge(cfg.judge, cfg.hardware, "cuda:0")
    scorer.score(questions, completions, references)   # -> [1.0, 0.0, ...]
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Optional, Sequence

from finellama_rl.config import HardwareConfig, JudgeConfig
from finellama_rl.errors import ConfigError
from finellama_rl.rewards.frozen import FrozenScorer, batches, freeze, load_kwargs

log = logging.getLogger(__name__)

PROMPT_VERSION = 1
SYSTEM = "You are a careful grader of math solutions."
INSTRUCTION = "Is the student's final answer correct? Answer with exactly one word: CORRECT or INCORRECT."
NEGATIVE = re.compile(r"\b(incorrect|wrong|not\s+correct|false)\b", re.IGNORECASE)
POSITIVE = re.compile(r"\b(correct|right|true)\b", re.IGNORECASE)


def judge_messages(question: str, completion: str, reference: Optional[str]) -> List[Dict[str, str]]:
    """The fixed prompt (version PROMPT_VERSION)."""
    parts = ["Grade the student's solution to the math problem.", f"Problem:\n{question}"]
    if reference is not None:
        parts.append(f"Reference solution:\n{reference}")
    parts += [f"Student's solution:\n{completion}", INSTRUCTION]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def parse_verdict(text: str) -> Optional[bool]:
    """True (CORRECT), False (INCORRECT) or None (malformed: no verdict, or both)."""
    negative = NEGATIVE.search(text or "")
    stripped = NEGATIVE.sub(" ", text or "")  # "incorrect" contains "correct": look for a positive without them
    positive = POSITIVE.search(stripped)
    if bool(negative) == bool(positive):
        return None
    return bool(positive)


def judge_source(j: JudgeConfig) -> str:
    """The folder or hub id the judge loads (its conf/model option's path, tiny build or hub id)."""
    from finellama_rl.job.model import model_source

    if j.model is None:
        raise ConfigError("judge.model", "no judge model configured; choose one with model@judge.model=qwen2.5-14b")
    return model_source(j.model)


def load_judge_model(j: JudgeConfig, hardware: HardwareConfig, device: str):
    """(model, tokenizer) of the judge, frozen; tests replace this with a fake verdict model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = judge_source(j)
    revision = None if (j.model.path or j.model.tiny) else j.model.revision
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(source, revision=revision, **load_kwargs(j.quantization, hardware, device))
    return freeze(model), tokenizer


def load_judge(j: JudgeConfig, hardware: HardwareConfig, device: str) -> "JudgeScorer":
    model, tokenizer = load_judge_model(j, hardware, device)
    log.info("judge %s (%s) on %s", j.model.name, j.quantization.value, device)
    return JudgeScorer(model, tokenizer, device, j)


class JudgeScorer(FrozenScorer):
    def __init__(self, model, tokenizer, device: str, j: JudgeConfig):
        super().__init__(model, tokenizer, device)
        self.j = j
        self.description = f"judge {j.model.name if j.model else '?'} ({j.quantization.value})"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # generation appends on the right
        self.judged = self.malformed = 0
        self.verdicts: List[Optional[bool]] = []  # of the last score() call (tests, debugging)

    def prompt(self, question: str, completion: str, reference: Optional[str]) -> str:
        """The chat-templated judge prompt, the completion cut from its start to fit max_input_tokens."""
        tok = self.tokenizer
        render = lambda c: tok.apply_chat_template(judge_messages(question, c, reference), tokenize=False,
                                                   add_generation_prompt=True)
        overhead = len(tok(render(""), add_special_tokens=False)["input_ids"])
        room = max(16, self.j.max_input_tokens - overhead - 16)  # 16: "..." and re-tokenisation at the cut
        ids = tok(completion, add_special_tokens=False)["input_ids"]
        if len(ids) > room:
            completion = "..." + tok.decode(ids[-room:], skip_special_tokens=True)
        return render(completion)

    def generate(self, prompts: List[str]) -> List[str]:
        """Greedy verdicts for a batch of prompts (decoding set explicitly, see module doc)."""
        import torch

        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**enc, do_sample=False, temperature=None, top_p=None, top_k=None,
                                      repetition_penalty=1.0, max_new_tokens=self.j.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def score(self, questions: Sequence[str], completions: Sequence[str],
              references: Optional[Sequence[str]] = None) -> List[float]:
        if self.j.use_reference and references is None:
            raise ValueError("judge.use_reference=true needs the `answer` column")
        refs = list(references) if self.j.use_reference else [None] * len(questions)
        prompts = [self.prompt(q, c, r) for q, c, r in zip(questions, completions, refs)]
        self.verdicts = []
        for start, end in batches(len(prompts), self.j.batch_size):
            self.verdicts += [parse_verdict(text) for text in self.generate(prompts[start:end])]
        bad = sum(v is None for v in self.verdicts)
        if bad:
            log.debug("judge: %d of %d verdicts malformed (scored 0)", bad, len(self.verdicts))
        self.judged += len(self.verdicts)
        self.malformed += bad
        return [1.0 if v else 0.0 for v in self.verdicts]

    def drain_metrics(self) -> Dict[str, Any]:
        frac = self.malformed / self.judged if self.judged else 0.0
        out = {"train/judge_malformed_frac": frac, "train/judge_malformed": float(self.malformed)}
        self.judged = self.malformed = 0
        return out
