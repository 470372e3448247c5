"""Fit memory: the OOM-ladder rung that worked for a model/trainer/hardware/lengths/
batch, so the next launch of the same experiment starts there. Pure (no torch).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from finellama_rl.config import Config
from finellama_rl.ladder import Rung, Setting, rung_for_setting
from finellama_rl.results import atomic_write_json


def fit_key(cfg: Config) -> str:
    t = cfg.trainer
    return (f"{cfg.model.name}|{t.algo.value}|{cfg.hardware.name}|prompt{t.max_prompt_tokens}|"
            f"completion{t.max_completion_tokens}|batch{t.micro_batch * t.grad_accum}|G{t.num_generations}")


def fit_memory_path() -> Path:
    from finellama_rl.model import cache_root

    return cache_root() / "fit_memory.json"


def remembered_rung(cfg: Config, ladder: List[Rung], path: Optional[Path] = None) -> Optional[int]:
    path = path or fit_memory_path()
    if not cfg.ladder.remember_fit or not path.exists():
        return None
    entry = json.loads(path.read_text()).get(fit_key(cfg))
    if not entry:
        return None
    try:
        return rung_for_setting(ladder, Setting(**entry["setting"]))
    except (ValueError, TypeError):
        return None


def remember_fit(cfg: Config, rung: Rung, path: Optional[Path] = None) -> None:
    """Record the rung that worked (under a lock: many jobs may finish at once)."""
    from filelock import FileLock

    path = path or fit_memory_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        data = json.loads(path.read_text()) if path.exists() else {}
        data[fit_key(cfg)] = {"rung": rung.index, "setting": asdict(rung.setting)}
        atomic_write_json(path, data)
