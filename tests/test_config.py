"""Config composition: every group option composes and converts; bad input names
the key and exits 2; derived values are right."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finellama_rl.compose import CONF_DIR, expand_sweep, load_config, split_argv
from finellama_rl.errors import UsageError
from finellama_rl.config import Algo, Config, Device, eval_num_examples
from finellama_rl.errors import ConfigError

GROUP_OPTIONS = [
    (group, p.stem) for group in ("model", "trainer", "hardware", "data", "experiment")
    for p in sorted((CONF_DIR / group).glob("*.yaml"))
]


def test_every_group_has_options():
    groups = {g for g, _ in GROUP_OPTIONS}
    assert groups == {"model", "trainer", "hardware", "data", "experiment"}
    assert {o for g, o in GROUP_OPTIONS if g == "model"} >= {
        "tiny", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b"}
    assert {o for g, o in GROUP_OPTIONS if g == "hardware"} >= {"cpu", "a100_40", "a100_80", "h100", "h200", "l40s"}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_option_composes_and_converts(group, option, tmp_path):
    cfg = load_config([f"{group}={option}", f"run.results_dir={tmp_path}", f"run.dir={tmp_path / 'run'}"])
    assert isinstance(cfg, Config)
    assert cfg.trainer.grad_accum >= 1
    if group == "model":
        assert cfg.model.name == option
    if group == "hardware":
        assert cfg.hardware.name == option
        assert cfg.hardware.slurm.timeout_min > 0 and cfg.hardware.slurm.mem_gb > 0


def test_defaults_are_the_mission():
    """No group named: Qwen2.5-3B-Instruct, GRPO, GSM8K, one A100-80GB (the tiny model only by name)."""
    cfg = load_config([], resolve_paths=False)
    assert (cfg.model.name, cfg.model.hub_id, cfg.model.tiny) == ("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", False)
    assert (cfg.trainer.algo, cfg.data.source.value, cfg.hardware.name) == (Algo.grpo, "gsm8k", "a100_80")


@pytest.mark.parametrize("typo, close", [("seed_ppo3b", "seed_ppo_3b"), ("smok", "smoke"), ("turbo", None)])
def test_unknown_experiment_fails_like_every_group(typo, close):
    with pytest.raises(ConfigError) as err:
        load_config([f"experiment={typo}"], resolve_paths=False)
    assert err.value.key == "experiment"
    options = err.value.message.split("choose one of ")[1].split(".")[0].split("|")
    assert {"seed_ppo_3b", "smoke", "fast", "judge_7b_14b"} <= set(options) and options == sorted(options)
    assert (f"Did you mean experiment={close}?" in err.value.message) if close else "Did you mean" not in err.value.message


def test_model_shapes_are_the_instruct_models():
    cfg = load_config(["model=qwen2.5-3b"])
    assert cfg.model.hub_id == "Qwen/Qwen2.5-3B-Instruct"
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_kv_heads) == (2048, 36, 2)
    assert load_config(["model=qwen2.5-14b"]).model.tie_embeddings is False


def test_hardware_profiles():
    fat = load_config(["hardware=a100_80"]).hardware
    assert (fat.device, fat.gpu_mem_gb, fat.bf16, fat.slurm.timeout_min) == (Device.cuda, 80, True, 48 * 60)
    assert load_config(["hardware=cpu"]).hardware.bf16 is False


def test_grad_accum_is_derived():
    cfg = load_config(["trainer=grpo", "trainer.prompts_per_step=8", "trainer.num_generations=8", "trainer.micro_batch=4"])
    assert cfg.trainer.grad_accum == 16  # 64 sequences / micro batch 4
    ppo = load_config(["trainer=ppo", "trainer.prompts_per_step=64", "trainer.micro_batch=4", "trainer.ppo.num_mini_batches=2"])
    assert ppo.trainer.grad_accum == 8  # 64 / 2 mini-batches / 4


def test_smoke_experiment():
    cfg = load_config(["experiment=smoke"])
    assert (cfg.model.tiny, cfg.data.source.value, cfg.hardware.name) == (True, "arithmetic", "cpu")
    assert cfg.trainer.algo == Algo.grpo and cfg.trainer.max_steps == 8
    assert load_config(["experiment=smoke", "trainer=ppo"]).trainer.num_generations == 1


def test_run_dir_derived(tmp_path):
    cfg = load_config(["trainer=ppo", f"run.results_dir={tmp_path}", "run.sweep=s1"])
    assert cfg.run.name == "ppo-qwen2.5-3b-a100_80"
    assert Path(cfg.run.dir) == tmp_path / "s1" / "ppo-qwen2.5-3b-a100_80"
    assert load_config(["experiment=smoke", "trainer=ppo", f"run.results_dir={tmp_path}"]).run.name == "ppo-tiny-cpu"


BAD = [
    (["trainer.lerning_rate=1e-5"], "trainer.lerning_rate", "trainer.learning_rate"),
    (["model=qwen3"], "model", "qwen2.5-0.5b"),
    (["hardware=a100"], "hardware", "a100_80"),
    (["trainer=dpo"], "trainer", "grpo"),
    (["trainer.learning_rate=-1"], "trainer.learning_rate", "> 0"),
    (["trainer.max_steps=0"], "trainer.max_steps", "> 0"),
    (["trainer.max_steps=abc"], "trainer.max_steps", "Integer"),
    (["trainer.loss_type=foo"], "trainer.loss_type", "dapo"),
    (["trainer.micro_batch=3"], "trainer.micro_batch", "divisible"),
    (["trainer.num_generations=1"], "trainer.num_generations", "at least 2"),
    (["trainer=ppo", "trainer.num_generations=4"], "trainer.num_generations", "num_generations=1"),
    (["trainer.lora.rr=4"], "trainer.lora.rr", "trainer.lora.r"),
    (["trainer.rewards=[correct]"], "trainer.rewards", "correctness"),
    (["trainer.grad_accum=3"], "trainer.grad_accum", "derived"),
    (["trainer.top_p=1.5"], "trainer.top_p", "(0, 1]"),
    (["eval.num_examples=lots"], "eval.num_examples", "all"),
    (["trainer.lora.enabled=false"], "trainer.lora.enabled", "quantization.enabled=false"),
    (["+trainer.foo=1"], "trainer.foo", "schema"),
]


@pytest.mark.parametrize("overrides,key,hint", BAD)
def test_bad_input_names_key(overrides, key, hint):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert err.value.key == key
    assert hint in str(err.value)


def test_eval_num_examples():
    assert eval_num_examples("all") is None and eval_num_examples("50") == 50
    with pytest.raises(ConfigError):
        eval_num_examples("0")


@pytest.mark.parametrize("module, args, needles", [
    ("finellama_rl.launch", ["trainer.lerning_rate=1"], ["trainer.lerning_rate", "Did you mean trainer.learning_rate"]),
    ("finellama_rl.train", ["trainer.lerning_rate=1"], ["trainer.lerning_rate", "Did you mean trainer.learning_rate"]),
    ("finellama_rl.launch", ["experiment=seed_ppo3b"], ["experiment: unknown option 'seed_ppo3b'", "seed_ppo_3b|",
                                                        "Did you mean experiment=seed_ppo_3b?"]),
    ("finellama_rl.plan", ["experiment=turbo"], ["experiment: unknown option 'turbo'", "seed_ppo_3b|"]),
])
def test_cli_exit_code_2_without_traceback(module, args, needles, tmp_path):
    proc = subprocess.run([sys.executable, "-m", module, *args, f"run.results_dir={tmp_path}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 2
    assert not any(tmp_path.iterdir())


def test_sweep_error_names_the_run_and_runs_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.launch", "-m", "trainer=ppo,grpo", "experiment=smoke",
                           "trainer.micro_batch=3", f"run.results_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "run 0 (trainer=ppo" in proc.stderr or "run 1 (trainer=grpo" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_expand_sweep():
    runs = expand_sweep(["trainer=ppo,grpo", "trainer.seed=1,2", "model=tiny"])
    assert [ovs for ovs, _ in runs] == [
        ["trainer=ppo", "trainer.seed=1", "model=tiny"], ["trainer=ppo", "trainer.seed=2", "model=tiny"],
        ["trainer=grpo", "trainer.seed=1", "model=tiny"], ["trainer=grpo", "trainer.seed=2", "model=tiny"]]
    assert runs[1][1] == ["seed=2"]


def test_split_argv():
    assert split_argv(["-m", "a=1"]) == (True, ["a=1"])
    with pytest.raises(UsageError):
        split_argv(["--fast"])
