"""Presets true to their seeds: each preset that reproduces a seed, composed from the real conf/,
against the seed's values in tests/fixtures/seeds.yaml (each with its source). A value the preset
does not reproduce fails the test unless the preset's header lists its key under "Differences from
the seed"; a listed key whose value agrees fails too (a stale declaration), and so does a listed
difference that README's "Presets and their seeds" table does not name."""
from __future__ import annotations

import dataclasses
import enum
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import yaml

from finellama_rl.compose import CONF_DIR, load_config
from finellama_rl.config import Config

REPO = Path(__file__).resolve().parent.parent
SEEDS = yaml.safe_load((REPO / "tests" / "fixtures" / "seeds.yaml").read_text())
DERIVED = {
    "max_sequence_tokens": lambda c: c.trainer.max_prompt_tokens + c.trainer.max_completion_tokens,
    "sequences_per_step": lambda c: c.trainer.prompts_per_step * c.trainer.num_generations,
    "gpus": lambda c: c.hardware.gpus_per_node,
}
MISSING = object()  # a key the schema does not have: the preset cannot express the seed's value
DECLARED_HEADING = "Differences from the seed"
DECLARED_KEY_RE = re.compile(r"^#   ([a-z_][a-z0-9_.]*): ")


def lookup(cfg: Config, key: str) -> Any:
    """The composed value of a dotted key (or a DERIVED figure); MISSING when the schema lacks it."""
    if key in DERIVED:
        return DERIVED[key](cfg)
    node: Any = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return MISSING
        node = getattr(node, part)
    return node


def same(actual: Any, expected: Any) -> bool:
    if isinstance(actual, enum.Enum):
        actual = actual.value
    if isinstance(actual, (list, tuple)):
        return isinstance(expected, list) and len(actual) == len(expected) and all(map(same, actual, expected))
    if isinstance(actual, bool) or isinstance(expected, bool):
        return actual is expected
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
        return math.isclose(actual, expected, rel_tol=1e-12, abs_tol=0.0)
    return actual == expected


def declared_differences(preset: str) -> List[str]:
    """Keys listed under the header's "Differences from the seed" (lines `#   <key>: why`)."""
    lines = (CONF_DIR / "experiment" / f"{preset}.yaml").read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("#") and DECLARED_HEADING in line), None)
    if start is None:
        return []
    keys = []
    for line in lines[start + 1:]:
        if not line.startswith("#   "):
            break
        match = DECLARED_KEY_RE.match(line)
        if match:
            keys.append(match.group(1))
    return keys


def differences(preset: str) -> Dict[str, Tuple[Any, Any]]:
    """{key: (preset's value, seed's value)} for every seed value the composed preset does not reproduce."""
    cfg = load_config([f"experiment={preset}"], resolve_paths=False)
    out = {}
    for key, entry in SEEDS[preset]["values"].items():
        actual = lookup(cfg, key)
        if actual is MISSING or not same(actual, entry["value"]):
            out[key] = ("(no such setting)" if actual is MISSING else actual, entry["value"])
    return out


def test_the_fixture_names_a_source_for_every_value_and_only_real_presets():
    presets = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    assert set(SEEDS) <= presets and {"seed_ppo_3b", "nanochat_rl", "sft_1epoch", "full", "dev_0p5b"} <= set(SEEDS)
    for preset, spec in SEEDS.items():
        assert spec["seed"] and spec["values"], preset
        for key, entry in spec["values"].items():
            assert set(entry) == {"value", "source"} and entry["source"].strip(), f"{preset}: {key}"


@pytest.mark.parametrize("preset", sorted(SEEDS))
def test_preset_reproduces_its_seed_except_where_its_header_says(preset):
    found, declared = differences(preset), declared_differences(preset)
    undeclared = {k: v for k, v in found.items() if k not in declared}
    assert not undeclared, (f"experiment={preset} differs from its seed in {undeclared} ((preset, seed)); make the "
                            f"preset reproduce the seed, or list the key under '# {DECLARED_HEADING}' in its header")
    stale = [k for k in declared if k in SEEDS[preset]["values"] and k not in found]
    assert not stale, f"experiment={preset}'s header declares {stale} different, but the preset reproduces the seed there"


def test_every_declared_difference_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Presets and their seeds", 1)[1].split("\n## ", 1)[0]
    rows = {}  # preset -> its row (a row's first cell may name several presets)
    for line in (l for l in section.splitlines() if l.startswith("| `")):
        for name in re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]):
            rows[name] = line
    for preset in SEEDS:
        assert preset in rows, f"README 'Presets and their seeds' has no row for {preset}"
        for key in declared_differences(preset):
            assert f"`{key}`" in rows[preset], f"README's row for {preset} does not name its difference {key}"


def test_the_checker_sees_a_difference_the_header_does_not_declare(monkeypatch):
    """The test can fail: a seed value changed in the fixture is a difference no header declares."""
    fake = {"seed_ppo_3b": {**SEEDS["seed_ppo_3b"], "values": {**SEEDS["seed_ppo_3b"]["values"],
                                                               "trainer.lora.r": {"value": 16, "source": "x"}}}}
    monkeypatch.setitem(SEEDS, "seed_ppo_3b", fake["seed_ppo_3b"])
    found = differences("seed_ppo_3b")
    assert found["trainer.lora.r"] == (8, 16) and "trainer.lora.r" not in declared_differences("seed_ppo_3b")
    assert "trainer.generation_batch" in found and "trainer.generation_batch" in declared_differences("seed_ppo_3b")


def test_seed_ppo_3b_is_the_base_model_with_every_checkpoint_and_checkpointing():
    cfg = load_config(["experiment=seed_ppo_3b"], resolve_paths=False)
    assert (cfg.model.name, cfg.model.hub_id) == ("qwen2.5-3b-base", "Qwen/Qwen2.5-3B")
    instruct = load_config(["model=qwen2.5-3b"], resolve_paths=False).model
    shape = ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "intermediate_size", "vocab_size")
    assert [getattr(cfg.model, k) for k in shape] == [getattr(instruct, k) for k in shape]  # same shapes
    assert cfg.trainer.keep_last == 0 and cfg.trainer.max_steps // cfg.trainer.save_every == 25  # all 25 kept
    assert cfg.trainer.activation_checkpointing is True
