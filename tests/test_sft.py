"""SFT through TRL's SFTTrainer (trainer=sft): the seed's presets, the run folder it
writes, fp32 trainable weights on a 4-bit base, resume mid-epoch at the same sample,
the OOM ladder's batch rungs, and keep-best restoring the best checkpoint."""
from __future__ import annotations

import json
import math

import pytest

from finellama_rl.checkpoint import list_checkpoints
from finellama_rl.fileio import read_jsonl
from finellama_rl.trainers.run import run_training
from finellama_rl.errors import EXIT_CRASH_TEST

TINY = ["model=tiny", "data=arithmetic", "hardware=cpu", "eval.protocol=finellama", "eval.num_examples=4",
        "eval.max_new_tokens=8", "data.num_train=64", "data.num_test=8"]
SFT = [*TINY, "trainer=sft", "trainer.prompts_per_step=8", "trainer.micro_batch=8", "trainer.learning_rate=1e-2",
       "trainer.max_completion_tokens=16"]

# The seed's SFT table (issue 12): epochs, lr, schedule, warmup ratio, weight decay, eval/save
# cadence, checkpoints kept (0: all, the seed's "unlimited": issue 21), load best at end, dataloader
# workers; every recipe trains LoRA on q, v and o (issue 21; tests/test_seed_presets.py checks the sources).
SEED_PRESETS = {
    "sft_1epoch": dict(epochs=1, lr=2e-4, schedule="linear", warmup=0.03, wd=0.0, eval=500, save=500, keep=0, best=False, workers=0),
    "sft_2epoch": dict(epochs=2, lr=1e-4, schedule="linear", warmup=0.03, wd=0.0, eval=500, save=1000, keep=0, best=False, workers=0),
    "sft_5epoch": dict(epochs=5, lr=5e-5, schedule="cosine", warmup=0.05, wd=0.01, eval=500, save=500, keep=3, best=True, workers=0),
    "sft_best": dict(epochs=6, lr=4e-5, schedule="cosine", warmup=0.06, wd=0.01, eval=250, save=250, keep=5, best=True, workers=2),
}


@pytest.mark.parametrize("preset", sorted(SEED_PRESETS))
def test_sft_presets_compose_with_the_seed_values(preset, make_config):
    want = SEED_PRESETS[preset]
    t = make_config(f"experiment={preset}").trainer
    assert t.algo.value == "sft" and t.num_generations == 1
    assert t.sft.epochs == want["epochs"] and math.isclose(t.learning_rate, want["lr"])
    assert t.lr_schedule.value == want["schedule"] and math.isclose(t.sft.warmup_ratio, want["warmup"])
    assert math.isclose(t.weight_decay, want["wd"]) and t.eval_every == want["eval"] and t.save_every == want["save"]
    assert t.keep_last == want["keep"] and t.sft.keep_best == want["best"] and t.sft.dataloader_workers == want["workers"]
    assert t.sft.best_metric.value == "accuracy" and t.lora.target_modules == ["q_proj", "v_proj", "o_proj"]


def test_sft_smoketest_preset_is_one_epoch_of_a_tiny_slice(make_config):
    cfg = make_config("experiment=sft_smoketest")
    assert cfg.trainer.algo.value == "sft" and cfg.trainer.sft.epochs == 1
    assert cfg.data.max_train_examples == 64 and cfg.eval.num_examples == "16"


def test_sft_settings_are_validated(make_config):
    from finellama_rl.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.sft.keep_best"):
        make_config(*SFT, "trainer.sft.keep_best=true", "trainer.eval_every=0")
    with pytest.raises(ConfigError, match="trainer.num_generations"):
        make_config(*SFT, "trainer.num_generations=4")
    with pytest.raises(ConfigError, match="warmup_ratio"):
        make_config(*SFT, "trainer.sft.warmup_ratio=1.5")


def test_sft_targets_follow_the_evaluation_protocol():
    """The SFT completion is what a perfect model writes under the run's protocol."""
    from finellama_rl.config import EvalProtocol
    from finellama_rl.trainers.sft import sft_rows

    row = {"prompt": "<prompt>", "question": "q", "answer": "Half of 48 is <<48/2=24>>24.\n#### 24"}
    (boxed,) = sft_rows([row], EvalProtocol.qwen_boxed)
    assert boxed == {"prompt": "<prompt>", "completion": "Half of 48 is 24.\nThe final answer is $\\boxed{24}$."}
    assert sft_rows([row], EvalProtocol.finellama)[0]["completion"] == "Half of 48 is 24.\n#### 24"


def test_epochs_set_max_steps(make_config):
    from finellama_rl.config import sft_max_steps

    t = make_config(*SFT, "trainer.sft.epochs=1.5").trainer
    assert sft_max_steps(t, 64) == 12  # ceil(1.5 * 64 / 8)
    assert sft_max_steps(make_config(*SFT, "trainer.max_steps=7").trainer, 64) == 7  # no epochs: max_steps


def test_sft_run_writes_the_run_folder_in_fp32(make_config, tmp_path, monkeypatch):
    """One epoch (8 steps) on a 4-bit base: config, metrics with the progress keys, stats,
    committed checkpoints, baseline and final accuracy by generation; LoRA weights and
    AdamW state fp32 although TRL casts them to bf16."""
    import torch
    from trl import SFTTrainer

    seen = {}
    original = SFTTrainer.train

    def train_and_inspect(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen["params"] = {p.dtype for p in self.model.parameters() if p.requires_grad}
        seen["state"] = {v.dtype for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()}
        return out

    monkeypatch.setattr(SFTTrainer, "train", train_and_inspect)
    cfg = make_config(*SFT, "trainer.sft.epochs=1", "trainer.save_every=4", "trainer.keep_last=1")
    assert cfg.trainer.quantization.enabled and cfg.trainer.lora.enabled
    assert run_training(cfg) == 0
    assert seen["params"] == {torch.float32} and seen["state"] == {torch.float32}, seen
    run = tmp_path / "run"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 9))  # 64 examples / 8 per step
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/token_accuracy", "perf/sec_per_step"} <= set(metrics[-1])
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"]
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step_000008"]
    assert "max_steps: 8" in (run / "config.yaml").read_text()  # epochs -> steps, recorded
    ev = json.loads((run / "eval_results.json").read_text())
    assert ev["trainer"] == "sft" and ev["step"] == 8 and ev["total"] == 4 and ev["baseline"]["total"] == 4
    stats = json.loads((run / "training_stats.json").read_text())
    assert stats["summary"]["last_step"] == 8


def _losses(run):
    return {m["step"]: m["train/loss"] for m in read_jsonl(run / "metrics.jsonl")}


def test_sft_resume_continues_mid_epoch_at_the_same_sample(make_config, tmp_path):
    """A run stopped after step 3 of an 8-step epoch resumes at step 4 on the very batches an
    uninterrupted run trains on: identical per-step losses (same samples, same weights)."""
    args = [*SFT, "trainer.max_steps=12", "trainer.save_every=3", "trainer.keep_last=5", "eval.before_training=false"]
    assert run_training(make_config(*args, run_dir=str(tmp_path / "straight"))) == 0
    assert run_training(make_config(*args, "debug.crash_after_step=3", run_dir=str(tmp_path / "resumed"))) == EXIT_CRASH_TEST
    assert sorted(_losses(tmp_path / "resumed")) == [1, 2, 3]
    assert run_training(make_config(*args, run_dir=str(tmp_path / "resumed"))) == 0
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(4, 13):  # steps 4-8 finish epoch 1 mid-way from the checkpoint, 9-12 are epoch 2
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), (step, resumed[step], straight[step])


def test_sft_steps_down_the_batch_rungs_on_out_of_memory(make_config, tmp_path):
    """A simulated memory budget that micro batch 8 exceeds: the ladder halves the micro
    batch (doubling accumulation) and the run completes with the same examples per step."""
    cfg = make_config(*SFT, "trainer.max_steps=4", "trainer.save_every=2", "debug.oom_above_tokens=400",
                      "eval.before_training=false")
    assert run_training(cfg) == 0
    attempts = read_jsonl(tmp_path / "run" / "attempts.jsonl")
    assert attempts[0]["outcome"] == "oom" and attempts[-1]["outcome"] == "completed"
    assert attempts[-1]["micro_batch"] < 8 and attempts[-1]["micro_batch"] * attempts[-1]["grad_accum"] == 8
    assert sorted({m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")}) == [1, 2, 3, 4]


def test_keep_best_restores_the_best_checkpoint(make_config, tmp_path, monkeypatch):
    """Scripted eval accuracies 0.2, 0.6, 0.4 at steps 2, 4, 6: step 4 is the best. It is kept
    although keep_last=1, recorded in best_checkpoint.json, and its weights are the ones the
    run ends with (and evaluates); model.adapter=<run> then resolves to it."""
    from safetensors.torch import load_file

    from finellama_rl.artifacts import resolve_adapter
    from finellama_rl.trainers import sft

    scripted = {2: 0.2, 4: 0.6, 6: 0.4}
    monkeypatch.setattr(sft, "measure", lambda trainer, ctx, model, step: (scripted[step], {"eval/accuracy": scripted[step]}))
    restored = {}
    original = sft.restore_best

    def restore_and_capture(policy, best, checkpoints):
        step = original(policy, best, checkpoints)
        restored["weights"] = {k: v.detach().clone() for k, v in policy.state_dict().items() if ".default." in k and "lora_" in k}
        return step

    monkeypatch.setattr(sft, "restore_best", restore_and_capture)
    cfg = make_config(*SFT, "trainer.max_steps=6", "trainer.save_every=2", "trainer.eval_every=2", "trainer.keep_last=1",
                      "trainer.sft.keep_best=true", "eval.before_training=false")
    assert run_training(cfg) == 0
    run = tmp_path / "run"
    best = json.loads((run / "best_checkpoint.json").read_text())
    assert best["step"] == 4 and best["value"] == 0.6 and best["restored"] is True and best["metric"] == "accuracy"
    assert [h["step"] for h in best["history"]] == [2, 4, 6]
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step_000004", "step_000006"]
    saved = load_file(str(run / "checkpoints" / "step_000004" / "adapter_model.safetensors"))
    assert len(saved) == len(restored["weights"]) > 0
    for key, value in saved.items():
        live = [v for k, v in restored["weights"].items() if k.replace(".default", "") == key]
        assert len(live) == 1 and bool((live[0] == value).all()), key
    assert json.loads((run / "eval_results.json").read_text())["restored_checkpoint_step"] == 4
    assert resolve_adapter(str(run)) == run / "checkpoints" / "step_000004"


def test_keep_best_selects_on_the_validation_split_and_reports_on_test(make_config, tmp_path, monkeypatch):
    """The evaluations keep-best compares (generation and eval/loss) are of validation
    problems, never test ones; best_checkpoint.json says so; the final evaluation of the
    restored checkpoint is on the test split."""
    from finellama_rl.task.data import load_problems
    from finellama_rl.trainers import sft

    loss_rows = []
    original = sft.eval_loss_rows
    monkeypatch.setattr(sft, "eval_loss_rows", lambda cfg, tok: loss_rows.extend(original(cfg, tok)) or loss_rows)
    cfg = make_config(*SFT, "trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=2", "trainer.keep_last=1",
                      "trainer.sft.keep_best=true", "data.validation_size=6")
    assert run_training(cfg) == 0
    run = tmp_path / "run"
    val, test = (load_problems(cfg.data, s) for s in ("validation", "test"))
    assert not {p["question"] for p in val} & {p["question"] for p in test}
    for step in (2, 4):  # 4: keep-best also weighs the final weights
        doc = json.loads((run / "evals" / f"step_{step:06d}.json").read_text())
        assert doc["split"]["name"] == "validation" and doc["split"]["size"] == 6
        assert [r["question"] for r in doc["records"]] == [p["question"] for p in val[:4]]  # eval.num_examples=4
    assert len(loss_rows) == 4 and all(any(p["question"] in r["prompt"] for p in val[:4]) for r in loss_rows)
    assert not any(p["question"] in r["prompt"] for p in test for r in loss_rows)
    assert json.loads((run / "best_checkpoint.json").read_text())["split"] == "validation"
    for name in ("eval_results.json", "eval_baseline.json"):
        doc = json.loads((run / name).read_text())
        assert doc["split"]["name"] == "test" and [r["question"] for r in doc["records"]] == [p["question"] for p in test[:4]]
