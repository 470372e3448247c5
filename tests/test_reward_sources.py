"""Reward sources (rewards/sources.py, reward_model.py, judge.py): the registry, validation of
scoring models and their GPUs, tiny ORM/PRM reward models and a judge with a fake verdict
model. All on CPU with models built here (no download)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finellama_rl.errors import ConfigError

TINY = ["model=tiny", "data=arithmetic", "hardware=cpu"]


def compose(*overrides):
    from finellama_rl.compose import load_config

    return load_config([*TINY, *overrides], resolve_paths=False)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("overrides, key", [
    (["trainer.rewards=[reward_model]"], "reward_model.model"),
    (["trainer.rewards=[reward_model]", "model@reward_model.model=tiny"], "reward_model.path"),
    (["trainer.rewards=[judge]"], "judge.model"),
    (["model@reward_model.model=tiny", "reward_model.aggregation=max"], "reward_model.aggregation"),
    (["trainer.rewards=[reward_model]", "model@reward_model.model=tiny", "reward_model.path=x", "reward_model.gpu=0"],
     "reward_model.gpu"),
    (["trainer.rewards=[judge]", "model@judge.model=tiny", "hardware=gpu24x2", "judge.gpu=2"], "judge.gpu"),
    (["trainer.rewards=[judge]", "model@judge.model=tiny", "hardware=gpu24x2", "hardware.processes=2", "judge.gpu=1",
      "trainer.prompts_per_step=2"], "judge.gpu"),
    (["trainer.rewards=[correctness,rubric]"], "trainer.rewards"),
    (["trainer.quantization.bits=6"], "trainer.quantization.bits"),
    (["trainer.rewards=[correctness,judge]", "model@judge.model=tiny", "trainer.reward_weights=[1.0]"], "trainer.reward_weights"),
])
def test_bad_scoring_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        compose(*overrides)
    assert err.value.key == key, err.value


def test_missing_reward_model_exits_2_before_any_model_loads(tmp_path):
    """A reward_model.path that does not exist: exit 2 naming the key, and no model is built."""
    env_home = tmp_path / "hf"
    cmd = [sys.executable, "-m", "finellama_rl.train", *TINY, "trainer.rewards=[reward_model]",
           "model@reward_model.model=tiny", f"reward_model.path={tmp_path / 'nope'}", f"run.results_dir={tmp_path}",
           f"run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "HF_HOME": str(env_home)})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "reward_model.path" in out.stderr
    assert not (env_home / "finellama_rl").exists()  # the tiny policy was never built


def test_gpu_split_two_gpu_preset_places_the_reward_model_on_gpu_1(monkeypatch):
    """experiment=2gpu: one training process (GPU 0), the reward model on cuda:1 (device naming on CPU)."""
    from finellama_rl.config import world_size
    from finellama_rl.rewards.sources import scoring_device

    monkeypatch.setenv("LOCAL_RANK", "0")
    from finellama_rl.compose import load_config

    cfg = load_config(["experiment=2gpu"], resolve_paths=False)
    assert cfg.hardware.gpus_per_node == 2 and world_size(cfg.hardware) == 1
    assert scoring_device(cfg.hardware, cfg.reward_model.gpu) == "cuda:1"
    assert scoring_device(cfg.hardware, None) == "cuda:0"  # the policy's (rank 0's) GPU
    plain = load_config(["hardware=gpu24x2", "trainer.prompts_per_step=2"], resolve_paths=False)
    assert world_size(plain.hardware) == 2  # without a scorer of its own GPU: data parallel on both
    assert scoring_device(compose().hardware, None) == "cpu"


# ----------------------------------------------------------------------------- registry


def test_registry_names_rule_rewards_like_trainer_rewards():
    from finellama_rl.rewards.sources import NamedReward, build_reward_sources

    cfg = compose("trainer.rewards=[correctness,format,digits]", "eval.protocol=finellama")
    funcs = build_reward_sources(cfg)
    assert [f.__name__ for f in funcs] == ["correctness", "format", "digits"]
    assert all(isinstance(f, NamedReward) for f in funcs)
    assert funcs[0](["1 + 2 = 3\n#### 3", "#### 4"], answer=["#### 3", "#### 3"]) == [1.0, 0.0]


def test_parse_verdict():
    from finellama_rl.rewards.judge import parse_verdict

    assert parse_verdict("CORRECT") is True
    assert parse_verdict("  **Correct.**") is True
    assert parse_verdict("INCORRECT") is False
    assert parse_verdict("The answer is wrong") is False
    assert parse_verdict("not correct") is False
    for bad in ("", "maybe", "CORRECT or INCORRECT", "42", "\x00\x01"):
        assert parse_verdict(bad) is None, bad


# ------------------------------------------------------------------- tiny scoring models


@pytest.fixture(scope="module")
def tiny_folder():
    from finellama_rl.job.model import ensure_tiny_model

    return ensure_tiny_model(compose().model)


def _save_classifier(folder: Path, tiny_folder: Path, prm: bool) -> Path:
    import torch
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForSequenceClassification, Qwen2ForTokenClassification

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    config = AutoConfig.from_pretrained(tiny_folder)
    if prm:
        tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    config.num_labels = 2 if prm else 1
    config.pad_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    model = (Qwen2ForTokenClassification if prm else Qwen2ForSequenceClassification)(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("precision", ["fp32", "nf4", "int8"])
def test_orm_folder_scores_in_unit_interval_batch_invariant(tmp_path, tiny_folder, precision):
    from finellama_rl.rewards.reward_model import load_reward_model

    path = _save_classifier(tmp_path / "orm", tiny_folder, prm=False)
    cfg = compose("model@reward_model.model=tiny", f"reward_model.path={path}", f"reward_model.quantization={precision}",
                  "reward_model.batch_size=4")
    scorer = load_reward_model(cfg.reward_model, cfg.hardware, "cpu")
    qs = [f"Ava has {i} coins. How many?" for i in range(6)]
    cs = [f"{i} + 1 = {i + 1}\n#### {i + 1}" + " pad" * i for i in range(6)]
    scores = scorer.score(qs, cs)
    assert len(scores) == 6 and all(0.0 <= s <= 1.0 for s in scores)
    one_by_one = [scorer.score([q], [c])[0] for q, c in zip(qs, cs)]
    assert scores == pytest.approx(one_by_one, abs=2e-2 if precision != "fp32" else 1e-5)  # left padding is harmless
    assert not any(p.requires_grad for p in scorer.model.parameters())


def test_prm_step_scores_and_aggregations(tmp_path, tiny_folder):
    import torch

    from finellama_rl.rewards.reward_model import aggregate, load_reward_model, split_steps

    path = _save_classifier(tmp_path / "prm", tiny_folder, prm=True)
    cfg = compose("model@reward_model.model=tiny", f"reward_model.path={path}", "reward_model.kind=prm",
                  "reward_model.quantization=fp32")
    scorer = load_reward_model(cfg.reward_model, cfg.hardware, "cpu")
    completion = "2 + 3 = 5\n\n5 + 1 = 6\n\n#### 6"
    assert split_steps(completion, "\n\n") == ["2 + 3 = 5", "5 + 1 = 6", "#### 6"]
    text = scorer.texts(["q"], [completion])[0]
    assert text.count("<extra_0>") == 3
    enc = scorer.tokenizer([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        probs = torch.softmax(scorer.model(**enc).logits[0], -1)[:, 1]
    steps = probs[enc["input_ids"][0] == scorer.step_token_id].tolist()
    assert len(steps) == 3
    for how, expected in (("min", min(steps)), ("last", steps[-1]), ("mean", sum(steps) / 3)):
        scorer.rm.aggregation = how
        assert scorer.score(["q"], [completion])[0] == pytest.approx(expected, abs=1e-5)
        assert aggregate(steps, how) == pytest.approx(expected)
    assert aggregate([], "min") == 0.0


# ------------------------------------------------------------------------------ the judge


class FakeVerdictModel:
    """Stands in for a judge LLM: answers from the prompt itself (CORRECT when the student's
    final answer equals the reference's), or garbage for a question that mentions 'garbage'."""

    def __init__(self, tokenizer):
        import torch

        self.tok, self.device, self.calls = tokenizer, torch.device("cpu"), 0
        self._p = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def parameters(self):
        return iter([self._p])

    def buffers(self):
        return iter([])

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        import re

        import torch

        self.calls += 1
        rows = []
        for ids in input_ids:
            prompt = self.tok.decode(ids, skip_special_tokens=True)
            ref = re.search(r"Reference solution:\n.*?#### (\d+)", prompt, re.S)
            student = re.findall(r"#### (\d+)", prompt.split("Student's solution:")[-1])
            verdict = "\x01\x02 hmm" if "garbage" in prompt else (
                "CORRECT" if ref and student and student[-1] == ref.group(1) else "Incorrect.")
            rows.append(self.tok(verdict, add_special_tokens=False)["input_ids"][:max_new_tokens])
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], 1)


def _fake_judge(monkeypatch, tiny_folder):
    from transformers import AutoTokenizer

    import finellama_rl.rewards.judge as judge_mod

    made = []

    def fake_load(j, hardware, device):
        tok = AutoTokenizer.from_pretrained(tiny_folder)
        made.append(FakeVerdictModel(tok))
        return made[-1], tok

    monkeypatch.setattr(judge_mod, "load_judge_model", fake_load)
    return made


def test_judge_scores_with_a_fake_verdict_model_and_counts_malformed(monkeypatch, tiny_folder):
    from finellama_rl.rewards.sources import build_reward_sources

    made = _fake_judge(monkeypatch, tiny_folder)
    cfg = compose("trainer.rewards=[correctness,judge]", "model@judge.model=tiny", "judge.batch_size=2",
                  "eval.protocol=finellama")
    correctness, judge = build_reward_sources(cfg)
    qs = ["Ava has 2 coins.", "Ben has 3 coins.", "garbage question", "Kai has 5 coins."]
    answers = ["2 + 1 = 3\n#### 3", "#### 4", "#### 1", "#### 6"]
    completions = ["2 + 1 = 3\n#### 3", "3 + 2 = 5\n#### 5", "#### 1", "#### 6"]
    scores = judge(completions, question=qs, answer=answers)
    assert scores == [1.0, 0.0, 0.0, 1.0]  # the malformed verdict (third) scores 0
    assert judge.scorer.verdicts == [True, False, None, True]
    assert made[0].calls == 2  # batches of judge.batch_size=2
    m = judge.metrics(steps=1)
    assert m["train/judge_malformed_frac"] == pytest.approx(0.25) and m["train/judge_malformed"] == 1
    assert m["perf/reward/judge_s"] > 0 and "perf/reward/judge_weights_gb" in m
    assert judge.metrics(steps=1)["train/judge_malformed"] == 0  # drained per metrics line


def test_judge_prompt_keeps_the_end_of_a_long_completion(monkeypatch, tiny_folder):
    from finellama_rl.rewards.sources import build_reward_sources

    _fake_judge(monkeypatch, tiny_folder)
    cfg = compose("trainer.rewards=[judge]", "model@judge.model=tiny", "judge.max_input_tokens=400")
    (judge,) = build_reward_sources(cfg)
    long = "blah " * 400 + "#### 77"
    prompt = judge.scorer.prompt("Q?", long, "#### 77")
    assert "#### 77" in prompt and prompt.rstrip().endswith("assistant")
    assert "CORRECT or INCORRECT" in prompt and "Reference solution" in prompt
    assert 300 < len(judge.scorer.tokenizer(prompt)["input_ids"]) <= 400  # cut to fit, not to nothing


def test_real_tiny_judge_model_loads_and_malformed_output_scores_zero(tiny_folder):
    """A random tiny causal LM as the judge: it writes nonsense; every verdict is malformed, scored 0, no crash."""
    from finellama_rl.rewards.judge import load_judge

    cfg = compose("trainer.rewards=[judge]", "model@judge.model=tiny", "judge.quantization=fp32")
    scorer = load_judge(cfg.judge, cfg.hardware, "cpu")
    scores = scorer.score(["Ava has 2 coins."] * 3, ["#### 2", "#### 3", "x"], ["#### 2"] * 3)
    assert len(scores) == 3 and set(scores) <= {0.0, 1.0}
    assert scorer.malformed + sum(v is not None for v in scorer.verdicts) == 3


@pytest.mark.slow
@pytest.mark.parametrize("trainer, batch", [
    ("grpo", ["trainer.prompts_per_step=2", "trainer.num_generations=4", "trainer.micro_batch=8"]),
    ("ppo", ["trainer.prompts_per_step=4", "trainer.num_generations=1", "trainer.micro_batch=4", "trainer.warmup_steps=0"]),
])
def test_judge_runs_end_to_end_in_both_trainers(monkeypatch, tiny_folder, make_config, trainer, batch):
    """GRPO and PPO with the (fake) judge next to a rule reward, weighted: both train and log
    train/reward/<name> per source and the judge's scoring figures on every line."""
    from finellama_rl.trainers.run import run_training

    _fake_judge(monkeypatch, tiny_folder)
    cfg = make_config(*TINY, f"trainer={trainer}", "trainer.rewards=[judge,format]", "trainer.reward_weights=[1.0,0.5]",
                      "model@judge.model=tiny", "eval.protocol=finellama", *batch,
                      "trainer.max_steps=2", "trainer.save_every=2", "trainer.max_completion_tokens=8", "eval.num_examples=4",
                      "eval.max_new_tokens=8", "data.num_train=32", "data.num_test=8")
    assert run_training(cfg) == 0
    lines = [json.loads(x) for x in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for rec in lines:
        assert 0.0 <= rec["train/reward/judge"] <= 1.0 and 0.0 <= rec["train/reward/format"] <= 1.0
        assert rec["perf/reward/judge_s"] > 0 and "train/judge_malformed_frac" in rec
