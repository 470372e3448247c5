"""Fit memory: the OOM-ladder rung that worked for a setting, so that the next launch
of the same setting starts there instead of running out of memory again.

Written by the job side (job/oom_loop.py: the rung that finished), read on the login
side (login/planner.py: where launch starts a run), shown and cleared by
`python -m finellama_rl.fitmem`.

Keyed by everything that changes memory: the model (name and shape), the trainer
(algorithm, batch, group size, lengths, LoRA, quantization, checkpointing, value
head), the hardware (GPU memory, GPUs per node, bf16, the host memory limit
`hardware.slurm.mem_gb`). Runs with any `debug.*` fault injection never write it
(a simulated out-of-memory says nothing about real memory). It steps back up: after
`STEP_UP_AFTER` clean runs at rung k (started there, no out-of-memory) the next
launch tries rung k-1; if that runs out of memory the in-job ladder steps down again
and rung k is remembered anew.

Kept per user: `$FINELLAMA_FIT_MEMORY`, else `$XDG_STATE_HOME/finellama_rl/fit_memory.json`,
else `~/.local/state/finellama_rl/fit_memory.json` (not in a shared cache: one user's
small `--mem` runs must not steer another's). Pure: no torch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from finellama_rl.config import Config, DebugConfig
from finellama_rl.ladder.rungs import Rung, Setting
from finellama_rl.fileio import atomic_write_json, read_json, warn

STEP_UP_AFTER = 2  # clean runs at a rung before the next launch tries the rung above


def fit_memory_path() -> Path:
    explicit = os.environ.get("FINELLAMA_FIT_MEMORY")
    if explicit:
        return Path(explicit)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "finellama_rl" / "fit_memory.json"


def fit_fields(cfg: Config) -> Dict[str, Any]:
    """Every setting that changes the memory a run needs."""
    m, t, h = cfg.model, cfg.trainer, cfg.hardware
    return {
        "model": m.name, "params_b": m.params_b, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
        "vocab_size": m.vocab_size, "trainer": t.algo.value, "micro_batch": t.micro_batch, "grad_accum": t.grad_accum,
        "prompts_per_step": t.prompts_per_step, "num_generations": t.num_generations,
        "max_prompt_tokens": t.max_prompt_tokens, "max_completion_tokens": t.max_completion_tokens,
        "activation_checkpointing": t.activation_checkpointing, "lora_r": t.lora.r if t.lora.enabled else 0,
        "lora_targets": sorted(t.lora.target_modules) if t.lora.enabled else [],
        "quantization": [t.quantization.quant_type.value, t.quantization.double_quant] if t.quantization.enabled else None,
        "reference_kl": t.beta > 0, "value_head": t.ppo.value_head.value,
        "hardware": h.name, "device": h.device.value, "gpu_mem_gb": h.gpu_mem_gb, "gpus_per_node": h.gpus_per_node,
        "bf16": h.bf16, "host_mem_gb": h.slurm.mem_gb,
    }


def fit_key(cfg: Config) -> str:
    """`<model>|<trainer>|<hardware>|<hash of every memory setting>`: readable and exact."""
    digest = hashlib.sha1(json.dumps(fit_fields(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{cfg.model.name}|{cfg.trainer.algo.value}|{cfg.hardware.name}|{digest}"


def fault_injected(d: DebugConfig) -> bool:
    """True when any debug.* setting differs from its default (fault injection, test hooks)."""
    return asdict(d) != asdict(DebugConfig())


def read_memory(path: Optional[Path] = None) -> Dict[str, Dict[str, Any]]:
    """{key: entry}; a damaged file counts as empty (with a warning)."""
    path = path or fit_memory_path()
    if not path.exists():
        return {}
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        warn(f"fit memory {path} is unreadable ({str(exc).splitlines()[0]}); ignoring it")
        return {}
    if not isinstance(data, dict):
        warn(f"fit memory {path} is not a JSON object; ignoring it")
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("rung"), int)}


def _rung_index(ladder: List[Rung], entry: Dict[str, Any]) -> Optional[int]:
    """The list rung whose setting is the remembered one (generation batch aside), or None."""
    known = {f.name for f in fields(Setting)}
    try:
        setting = Setting(**{k: v for k, v in (entry.get("setting") or {}).items() if k in known})
    except TypeError:
        return None
    for rung in ladder:
        if asdict(rung.setting) | {"generation_batch": 0} == asdict(setting) | {"generation_batch": 0}:
            return rung.index
    return None


def remembered(cfg: Config, ladder: List[Rung], path: Optional[Path] = None) -> Optional[Tuple[int, str]]:
    """(rung to start at, why) from the fit memory, or None."""
    if not cfg.ladder.remember_fit:
        return None
    entry = read_memory(path).get(fit_key(cfg))
    if not entry:
        return None
    index = _rung_index(ladder, entry)
    if index is None:
        return None
    clean = entry.get("clean_runs", 0) if isinstance(entry.get("clean_runs"), int) else 0
    if index > 0 and clean >= STEP_UP_AFTER:
        return index - 1, f"fit memory: rung {index} worked {clean}x, trying rung {index - 1}"
    return index, "fit memory"


def remembered_rung(cfg: Config, ladder: List[Rung], path: Optional[Path] = None) -> Optional[int]:
    found = remembered(cfg, ladder, path)
    return None if found is None else found[0]


def remember_fit(cfg: Config, rung: Rung, clean: bool = True, path: Optional[Path] = None) -> bool:
    """Record that `rung` worked (under a lock: many jobs may finish at once). `clean`:
    the run started at this rung (no out-of-memory on the way). Returns False when
    nothing was written (fault-injected runs)."""
    from filelock import FileLock

    if fault_injected(cfg.debug):
        return False
    path = path or fit_memory_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=60):
        data = read_memory(path)
        key, old = fit_key(cfg), data.get(fit_key(cfg)) or {}
        same = old.get("rung") == rung.index
        clean_runs = (old.get("clean_runs", 0) + 1 if same else 1) if clean else 0
        data[key] = {"rung": rung.index, "setting": asdict(rung.setting), "clean_runs": clean_runs,
                     "updated": _dt.datetime.now().isoformat(timespec="seconds"), "run": cfg.run.dir,
                     "fields": fit_fields(cfg)}
        atomic_write_json(path, data)
    return True


def forget(cfg: Optional[Config] = None, path: Optional[Path] = None) -> int:
    """Forget one setting's entry (or every entry); returns how many were removed."""
    from filelock import FileLock

    path = path or fit_memory_path()
    if not path.exists():
        return 0
    with FileLock(str(path) + ".lock", timeout=60):
        data = read_memory(path)
        if cfg is None:
            path.unlink()
            return len(data)
        removed = int(data.pop(fit_key(cfg), None) is not None)
        atomic_write_json(path, data)
    return removed


def describe(cfg: Config, ladder: List[Rung], path: Optional[Path] = None) -> str:
    """One line for `plan`: what the fit memory says about this setting."""
    path = path or fit_memory_path()
    entry = read_memory(path).get(fit_key(cfg))
    if not cfg.ladder.remember_fit:
        return f"fit memory: off (ladder.remember_fit=false); file {path}"
    if not entry:
        return f"fit memory: nothing remembered for this setting (key {fit_key(cfg)}) in {path}"
    found = remembered(cfg, ladder, path)
    start = "does not match this ladder (ignored)" if found is None else f"launch starts at rung {found[0]}"
    return (f"fit memory: rung {entry['rung']} worked ({entry.get('clean_runs', 0)} clean run(s), {entry.get('updated')}); "
            f"{start}; forget it: python -m finellama_rl.fitmem --clear <same overrides>  [{path}]")
