"""Compose `conf/` with Hydra's compose API into a typed, resolved, validated `Config`.

We use `hydra.compose` rather than `@hydra.main` so that every bad input (unknown
group option, misspelled key, wrong type, impossible value) becomes one short line
naming the key and the valid choices, with exit code 2, before any model is loaded
or job submitted. Sweeps (`-m trainer=ppo,grpo`) are expanded here with Hydra's own
override grammar, one override list per run.

Entry points call `load_config(overrides)` and wrap `main()` in `cli_main`.
"""
from __future__ import annotations

import difflib
import itertools
import os
import re
import sys
import typing
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from finellama_rl.config import Config, ConfigError, derive_grad_accum, register_configs, resolve
from finellama_rl.validation import validate

CONF_DIR = Path(os.environ.get("FINELLAMA_CONF", Path(__file__).resolve().parent.parent / "conf"))
GROUPS = ("model", "trainer", "hardware", "data", "experiment")


class UsageError(ValueError):
    """Bad command-line usage (exit 2)."""


def _schema_at(path: Sequence[str]):
    """The dataclass type at a dotted path of the schema, or None."""
    node = Config
    for part in path:
        ftype = typing.get_type_hints(node).get(part) if is_dataclass(node) else None
        if ftype is None or not is_dataclass(ftype):
            return None
        node = ftype
    return node


def _suggest_key(full_key: str) -> str:
    parts = full_key.split(".")
    parent = _schema_at(parts[:-1])
    if parent is None:
        return ""
    valid = [f.name for f in fields(parent)]
    close = difflib.get_close_matches(parts[-1], valid, n=1)
    hint = f" Did you mean {'.'.join(parts[:-1] + close)}?" if close else ""
    return f"{hint} Valid keys under {'.'.join(parts[:-1]) or 'the root'}: {', '.join(valid)}."


def _options(group: str) -> List[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def explain_hydra_error(exc: BaseException) -> ConfigError:
    """Turn a Hydra/OmegaConf composition error into a one-line ConfigError."""
    text = str(exc)
    missing = re.search(r"Could not find '([\w.-]+)/([\w.-]+)'", text)
    if missing:
        group, option = missing.groups()
        close = difflib.get_close_matches(option, _options(group), n=1)
        hint = f" Did you mean {group}={close[0]}?" if close else ""
        return ConfigError(group, f"unknown option {option!r}; choose one of {'|'.join(_options(group))}.{hint}")
    detail = str(exc.__cause__ or exc).strip()
    key = re.search(r"full_key: ([\w.\[\]]+)", detail) or re.search(r"override '?([\w.]+)", text)
    reason = detail.splitlines()[0] if detail else text
    if key:
        full_key = key.group(1)
        extra = _suggest_key(full_key) if "not in" in reason else ""
        return ConfigError(full_key, f"{reason.rstrip('.')}.{extra}")
    return ConfigError("overrides", text.splitlines()[0] if text else reason)


def compose_raw(overrides: Sequence[str]):
    """Hydra composition only (DictConfig)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="finellama_rl"):
        return compose(config_name="config", overrides=list(overrides))


def site_file_path(raw) -> Optional[Path]:
    path = raw.get("site") or os.environ.get("FINELLAMA_SITE")
    if not path:
        return None
    if not Path(path).is_file():
        raise ConfigError("site", f"site file {path} not found; fix the path or unset FINELLAMA_SITE")
    return Path(path)


def apply_site_file(raw, overrides: Sequence[str]):
    """Merge the site file (cluster-wide and per-profile SLURM settings) under the
    command line: shipped profile < site file < command-line overrides.

    Site file format:  slurm: {account: x}   hardware: {a100_80: {slurm: {partition: fat}}}
    """
    from omegaconf import OmegaConf

    path = site_file_path(raw)
    if path is None:
        return raw
    site = OmegaConf.load(path)
    unknown = set(site.keys()) - {"slurm", "hardware"}
    if unknown:
        raise ConfigError(f"site:{sorted(unknown)[0]}", f"unknown section in {path}; expected slurm and/or hardware.<profile>.slurm")
    layers = [OmegaConf.create({"hardware": {"slurm": site.get("slurm") or {}}})]
    per_profile = (site.get("hardware") or {}).get(raw.hardware.name)
    if per_profile:
        layers.append(OmegaConf.create({"hardware": per_profile}))
    cli = [o for o in overrides if o.startswith("hardware.")]
    layers.append(OmegaConf.from_dotlist(cli))
    OmegaConf.set_struct(raw.hardware.slurm.additional, False)  # free-form sbatch options
    return OmegaConf.merge(raw, *layers)


def load_config(overrides: Sequence[str], name_parts: Sequence[str] = (), resolve_paths: bool = True) -> Config:
    """Compose, convert to dataclasses once, fill derived values, validate."""
    from omegaconf import OmegaConf

    added = [o for o in overrides if o.startswith("+") and not o.lstrip("+").startswith("hardware.slurm.additional.")]
    if added:
        raise ConfigError(added[0].lstrip("+").split("=")[0], "adding keys with '+' is not supported: every setting is in the schema; drop the '+'")
    try:
        raw = apply_site_file(compose_raw(overrides), overrides)
        cfg: Config = OmegaConf.to_object(raw)
    except ConfigError:
        raise
    except Exception as exc:  # hydra/omegaconf raise many types; all are user input here
        if type(exc).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        raise explain_hydra_error(exc) from None
    if resolve_paths:
        cfg = resolve(cfg, list(name_parts))
    else:  # derived training values only; no run folder (e.g. planning, sbatch scripts)
        cfg = replace(cfg, trainer=replace(cfg.trainer, grad_accum=cfg.trainer.grad_accum or derive_grad_accum(cfg.trainer, cfg.hardware)))
    validate(cfg)
    return cfg


def expand_sweep(overrides: Sequence[str]) -> List[Tuple[List[str], List[str]]]:
    """Cartesian product of sweep overrides (`a=1,2 b=x,y`).

    Returns (overrides for one run, name parts that distinguish it) per run.
    Group choices (trainer, model, hardware) are already in the run name, so
    only other swept keys become name parts.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as exc:
        raise UsageError(f"cannot parse overrides: {str(exc).splitlines()[0]}") from None
    axes = []
    for ov in parsed:
        key = ov.get_key_element()
        if ov.is_sweep_override():
            values = [f"{key}={v}" for v in ov.sweep_string_iterator()]
            axes.append([(v, key not in ("model", "trainer", "hardware")) for v in values])
        else:
            axes.append([(ov.input_line, False)])
    runs = []
    for combo in itertools.product(*axes):
        runs.append(([o for o, _ in combo], [o.split(".")[-1] for o, named in combo if named]))
    return runs


def split_argv(argv: Sequence[str]) -> Tuple[bool, List[str]]:
    """(multirun?, overrides) from argv; -m/--multirun may appear anywhere."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    rest = [a for a in argv if a not in ("-m", "--multirun")]
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        raise UsageError(f"unknown option {flags[0]!r}; usage: [-m] key=value ... (see README.md)")
    return multirun, rest


def cli_main(main: Callable[[List[str]], Optional[int]], argv: Optional[Sequence[str]] = None) -> None:
    """Run an entry point; user errors print one line and exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(args)
    except (ConfigError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
