"""RL from a trained adapter (model.adapter): where the adapter is found, the frozen
adapter under a trainable one, the KL reference being the SFT policy (KL exactly 0
before the first update), the SFT weights untouched by RL, and checkpoints that
hold both adapters so resume and evaluate need nothing else."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from finellama_rl.job.adapters import FROZEN
from finellama_rl.artifacts import resolve_adapter
from finellama_rl.errors import ConfigError
from finellama_rl.fileio import read_jsonl
from finellama_rl.trainers.run import run_training

TINY = ["model=tiny", "data=arithmetic", "hardware=cpu", "eval.protocol=finellama", "eval.num_examples=4",
        "eval.max_new_tokens=8", "data.num_train=64", "data.num_test=8"]
SFT = [*TINY, "trainer=sft", "trainer.max_steps=6", "trainer.save_every=3", "trainer.prompts_per_step=8",
       "trainer.micro_batch=8", "trainer.learning_rate=2e-2", "trainer.max_completion_tokens=16"]
RL = [*TINY, "trainer.max_steps=2", "trainer.warmup_steps=0", "trainer.rewards=[digits]", "trainer.save_every=1", "trainer.max_completion_tokens=8", "trainer.lora.dropout=0",
      "trainer.prompts_per_step=4", "trainer.micro_batch=4"]
RL_ARGS = {
    "grpo": ["trainer=grpo", "trainer.num_generations=4", "trainer.micro_batch=8", "trainer.beta=0.5", "trainer.learning_rate=1e-2"],
    "ppo": ["trainer=ppo", "trainer.num_generations=1", "trainer.ppo.kl_coef=0.5", "trainer.learning_rate=1e-2"],
}


def _fake_ckpt(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")  # valid, no tensors
    (folder / "adapter_config.json").write_text("{}")
    (folder / "finellama_state.json").write_text(json.dumps({"step": int(folder.name.split("_")[1])}))
    return folder


def test_resolve_adapter_run_folder_checkpoint_and_errors(tmp_path):
    run = tmp_path / "sft-run"
    c1 = _fake_ckpt(run / "checkpoints" / "step_000010")
    c2 = _fake_ckpt(run / "checkpoints" / "step_000020")
    assert resolve_adapter(str(run)) == c2  # a run folder: its latest checkpoint
    assert resolve_adapter(str(c1)) == c1  # a checkpoint folder: itself
    (run / "best_checkpoint.json").write_text(json.dumps({"checkpoint": str(c1), "restored": False}))
    assert resolve_adapter(str(run)) == c2  # a best that was not restored is not the run's final adapter
    (run / "best_checkpoint.json").write_text(json.dumps({"checkpoint": str(c1), "restored": True}))
    assert resolve_adapter(str(run)) == c1  # keep_best restored it: the run ended with step 10's weights
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_adapter(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a run folder"):
        resolve_adapter(str(tmp_path / "empty"))
    stacked = _fake_ckpt(tmp_path / "rl" / "checkpoints" / "step_000005")
    (stacked / FROZEN).mkdir()
    with pytest.raises(ConfigError, match="stacking a third adapter"):
        resolve_adapter(str(stacked))
    (c1 / "adapter_model.safetensors").write_bytes(b"\x10")  # truncated: refused with evaluate's and resume's words
    with pytest.raises(ConfigError, match=r"step_000010 is damaged \(adapter_model.safetensors is not a complete safetensors"):
        resolve_adapter(str(c1))


def test_adapter_config_errors(make_config):
    with pytest.raises(ConfigError, match="model.adapter"):
        make_config(*SFT, "model.adapter=/x")  # SFT starts from the base
    with pytest.raises(ConfigError, match="value_head"):
        make_config(*RL, *RL_ARGS["ppo"], "model.adapter=/x", "trainer.ppo.value_head=adapter")
    with pytest.raises(ConfigError, match="lora.enabled"):
        make_config(*RL, *RL_ARGS["ppo"], "model.adapter=/x", "trainer.lora.enabled=false", "trainer.quantization.enabled=false")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A short SFT of the tiny model: an adapter that differs clearly from the base."""
    from finellama_rl.compose import load_config

    root = tmp_path_factory.mktemp("sft")
    cfg = load_config([*SFT, f"run.results_dir={root}", f"run.dir={root / 'sft'}"])
    assert run_training(cfg) == 0
    return root / "sft"


def test_reference_is_the_frozen_adapter_policy(sft_run, make_config):
    """The stacked policy equals its reference (the SFT policy) exactly before any update,
    and both differ from the bare base: the reference is not the base."""
    import torch

    from finellama_rl.job.model import load_policy, load_tokenizer

    cfg = make_config(*RL, *RL_ARGS["grpo"], f"model.adapter={sft_run}")
    tok = load_tokenizer(cfg.model)
    policy = load_policy(cfg.model, cfg.trainer, cfg.hardware)
    assert policy.base_model.active_adapters == ["default", FROZEN]
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # the SFT adapter is frozen
    ids = tok(["Ava has 3 apples. How many apples?"], return_tensors="pt")
    with torch.no_grad():
        full = policy(**ids).logits
        with policy.disable_adapter():  # what PPO and GRPO use as the KL reference
            reference = policy(**ids).logits
        assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable  # no flag touched
        assert torch.equal(policy(**ids).logits, full)  # and both adapters are active again
        policy.base_model.disable_adapter_layers()  # PEFT's switch: every adapter off, the bare 4-bit base
        bare = policy(**ids).logits
    assert torch.equal(full, reference)
    assert not torch.allclose(reference, bare)


def _tensors(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_from_sft_adapter_kl_zero_first_step_and_sft_frozen(algo, sft_run, make_config, tmp_path):
    sft_file = resolve_adapter(str(sft_run)) / "adapter_model.safetensors"
    before = _tensors(sft_file)
    assert any(v.abs().max() > 0 for k, v in before.items() if "lora_B" in k), "the SFT adapter must have moved"
    cfg = make_config(*RL, *RL_ARGS[algo], f"model.adapter={sft_run}")
    assert run_training(cfg) == 0
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    # Reference = the SFT policy: before the first update the policy IS the reference.
    assert metrics[0]["train/kl"] == 0.0, metrics[0]["train/kl"]
    assert metrics[1]["train/kl"] > 0.0  # after one update at lr 1e-2 the policy has moved away from it
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    saved_sft = _tensors(ckpt / FROZEN / "adapter_model.safetensors")  # the checkpoint holds both adapters
    assert saved_sft.keys() == before.keys()
    for key, value in before.items():
        assert bool((saved_sft[key] == value).all()), f"SFT weight {key} changed during RL"
    trained = _tensors(ckpt / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k), "the RL adapter must have trained"
    assert _tensors(sft_file).keys() == before.keys()


@pytest.mark.slow
def test_rl_checkpoint_resumes_and_evaluates_with_both_adapters(sft_run, make_config, tmp_path):
    """A stacked run crashed after step 1 resumes at step 2; the evaluate command loads a
    checkpoint of it (both adapters) and reproduces the run's own final accuracy."""
    from finellama_rl.evaluate import main as evaluate_main
    from finellama_rl.errors import EXIT_CRASH_TEST

    args = [*RL, *RL_ARGS["grpo"], f"model.adapter={sft_run}"]
    assert run_training(make_config(*args, "debug.crash_after_step=1")) == EXIT_CRASH_TEST
    assert run_training(make_config(*args)) == 0
    run = tmp_path / "run"
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    final = json.loads((run / "eval_results.json").read_text())
    assert evaluate_main([f"run={run}", "checkpoint=latest"]) == 0
    evals = sorted((run / "evals").glob("step_000002*.json"))
    assert evals, list((run / "evals").iterdir())
    again = json.loads(evals[-1].read_text())
    assert again["correct"] == final["correct"] and again["total"] == final["total"]


def test_launch_refuses_a_missing_adapter_before_running(tmp_path):
    from finellama_rl.launch import main as launch_main

    with pytest.raises(ConfigError, match="model.adapter"):
        launch_main(["-m", "trainer=ppo,grpo", *TINY, "launcher=local", f"run.results_dir={tmp_path}",
                     f"model.adapter={tmp_path / 'no-such-run'}"])
    assert not any(tmp_path.rglob("config.yaml"))


@pytest.mark.slow
def test_launch_sweep_ppo_and_grpo_from_one_sft_run(sft_run, tmp_path):
    """The seed's "compare with GRPO" from one SFT start: -m trainer=ppo,grpo model.adapter=<run>."""
    from finellama_rl.launch import main as launch_main

    common = [*TINY, "trainer.max_steps=1", "trainer.save_every=1", "trainer.warmup_steps=0", "trainer.lora.dropout=0",
              "trainer.prompts_per_step=4", "trainer.micro_batch=4", "trainer.max_completion_tokens=8",
              "eval.before_training=false", "launcher=local", "run.sweep=compare", f"run.results_dir={tmp_path}"]
    assert launch_main(["-m", "trainer=ppo,grpo", *common, f"model.adapter={sft_run}"]) == 0
    for algo in ("ppo", "grpo"):
        run = tmp_path / "compare" / f"{algo}-tiny-cpu"
        assert json.loads((run / "eval_results.json").read_text())["trainer"] == algo
        assert f"adapter: {sft_run}" in (run / "config.yaml").read_text()
        assert (run / "checkpoints" / "step_000001" / FROZEN / "adapter_model.safetensors").is_file()
