"""Compose `conf/` with Hydra's compose API into a typed, resolved, validated `Config`.

We use `hydra.compose` rather than `@hydra.main` so that every bad input (unknown
group option, misspelled key, wrong type, impossible value) becomes one short line
naming the key and the valid choices, with exit code 2, before any model is loaded
or job submitted. Sweeps (`-m trainer=ppo,grpo`) are expanded here with Hydra's own
override grammar, one override list per run.

Composition also owns what is derived from the composed values: the GPU split between
training processes and scoring models (`derive_processes`), the run's name, sweep and
folder (`resolve`, `default_run_name`), and the YAML a run folder keeps (`config_yaml`).

Entry points call `load_config(overrides)` and wrap `main()` in `cli_main`.
"""
from __future__ import annotations

import copy
import datetime as _dt
import difflib
import itertools
import os
import re
import sys
import typing
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from finellama_rl.config import Algo, Config, Device, derive_grad_accum, register_configs, scoring_gpus
from finellama_rl.errors import ConfigError, FinellamaError, UsageError, exit_code
from finellama_rl.validation import validate, validate_run_paths

CONF_DIR = Path(os.environ.get("FINELLAMA_CONF", Path(__file__).resolve().parent.parent / "conf"))
GROUPS = ("model", "trainer", "hardware", "data", "experiment")


def _schema_at(path: Sequence[str]):
    """The dataclass type at a dotted path of the schema, or None."""
    node = Config
    for part in path:
        ftype = typing.get_type_hints(node).get(part) if is_dataclass(node) else None
        if ftype is None or not is_dataclass(ftype):
            return None
        node = ftype
    return node


RENAMED = {  # removed keys -> what to set instead (an old command line gets the new spelling)
    "trainer.ppo.whiten_advantages": "renamed (issue 20): use trainer.advantage_scaling=batch (true) or none (false)",
}


def older_run_settings(data: Dict[str, Any]) -> Dict[str, Any]:
    """A run folder's config.yaml data (plain, unresolved) in today's keys, for evaluate and
    resume: a PPO run written before issue 20 has trainer.ppo.whiten_advantages (true: batch,
    false: none) and no trainer.advantage_scaling, whose schema default (group) PPO refuses."""
    trainer = data.get("trainer")
    ppo = trainer.get("ppo") if isinstance(trainer, dict) else None
    if not isinstance(ppo, dict) or "whiten_advantages" not in ppo:
        return data
    ppo = {k: v for k, v in ppo.items() if k != "whiten_advantages"}
    trainer = {**trainer, "ppo": ppo}
    if "advantage_scaling" not in trainer and trainer.get("algo") == Algo.ppo.value:
        trainer["advantage_scaling"] = "none" if data["trainer"]["ppo"]["whiten_advantages"] is False else "batch"
    return {**data, "trainer": trainer}


def _suggest_key(full_key: str) -> str:
    if full_key in RENAMED:
        return f" It was {RENAMED[full_key]}."
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


def parse_overrides(overrides: Sequence[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def _is_defaults_override(ov) -> bool:
    """Overrides that change the defaults list (a group choice), not a config value."""
    key = ov.key_or_group
    return ov.package is not None or key.split(".")[0] == "hydra" or (CONF_DIR / key).is_dir() or key == "schema"


def _compose_groups(group_overrides: Tuple[str, ...]):
    """Hydra composition of a group selection, cached per process: a 100-run sweep over
    learning rates composes once per distinct (model, trainer, hardware, data,
    experiment) choice, not once per run (~80 ms each)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    cached = _COMPOSED.get(group_overrides)
    if cached is None:
        register_configs()
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="finellama_rl"):
            cached = compose(config_name="config", overrides=list(group_overrides))
        _COMPOSED[group_overrides] = cached
    return copy.deepcopy(cached)


_COMPOSED: Dict[Tuple[str, ...], Any] = {}


def apply_value_overrides(cfg, parsed) -> None:
    """Apply `key=value` overrides exactly as Hydra's compose does (same function, same
    errors), on a composed config."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    ConfigLoaderImpl._apply_overrides_to_config(list(parsed), cfg)


def compose_raw(overrides: Sequence[str]):
    """Hydra composition (DictConfig): the group choices composed (cached), then the
    value overrides applied in order, as `hydra.compose(overrides)` would."""
    parsed = parse_overrides(overrides)
    groups = tuple(ov.input_line for ov in parsed if _is_defaults_override(ov))
    cfg = _compose_groups(groups)
    apply_value_overrides(cfg, [ov for ov in parsed if not _is_defaults_override(ov)])
    return cfg


def site_file_path(raw) -> Optional[Path]:
    path = raw.get("site") or os.environ.get("FINELLAMA_SITE")
    if not path:
        return None
    origin = "site=" if raw.get("site") else "FINELLAMA_SITE="
    if not Path(path).is_file():
        raise ConfigError("site", f"site file {path} ({origin}{path}) not found; fix the path or unset it")
    return Path(path)


def load_site_file(path: Path) -> Dict[str, Any]:
    """The site file as plain data; ConfigError naming the file on any problem."""
    import yaml

    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError("site", f"{path} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("site", f"{path} must be a mapping with slurm: and/or hardware: sections")
    _check_site_keys(data, path)
    unknown = set(data) - {"slurm", "hardware"}
    if unknown:
        raise ConfigError(f"site:{sorted(map(str, unknown))[0]}", f"unknown section in {path}; expected slurm and/or hardware.<profile>.slurm")
    profiles = _options("hardware")
    for name, section in (data.get("hardware") or {}).items():
        if name not in profiles:
            close = difflib.get_close_matches(str(name), profiles, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(f"site:hardware.{name}", f"unknown hardware profile in {path}; choose one of {'|'.join(profiles)}.{hint}")
        if not isinstance(section, dict) or set(section) - {"slurm"}:
            raise ConfigError(f"site:hardware.{name}", f"in {path}: expected only a slurm: section under a profile")
    return data


def _check_site_keys(node: Any, path: Path, where: str = "") -> None:
    """Every key of the site file is a plain name: a control character (a newline would start
    a new line of the submission script) or a non-string key stops with one clean line
    naming the key as Python writes it ('acc\\nount')."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        shown = f"{where}{key!r}" if not isinstance(key, str) else f"{where}{key}"
        if not isinstance(key, str) or any(ord(c) < 32 or ord(c) == 127 for c in key):
            what = "is not a string" if not isinstance(key, str) else "contains a control character (newline, tab, ...)"
            raise ConfigError("site", f"key {where}{key!r} in {path} {what}; keys are plain names such as "
                                      "slurm.account or hardware.a100_80.slurm.partition")
        _check_site_keys(value, path, f"{shown}.")


def apply_site_file(raw, overrides: Sequence[str]):
    """Merge the site file (cluster-wide and per-profile SLURM settings) under the
    command line: shipped profile < site file < command-line overrides.

    Site file format:  slurm: {account: x}   hardware: {a100_80: {slurm: {partition: fat}}}
    """
    from omegaconf import OmegaConf

    path = site_file_path(raw)
    if path is None:
        return raw
    site = load_site_file(path)
    layers = [OmegaConf.create({"hardware": {"slurm": site.get("slurm") or {}}})]
    per_profile = (site.get("hardware") or {}).get(raw.hardware.name)
    if per_profile:
        layers.append(OmegaConf.create({"hardware": per_profile}))
    OmegaConf.set_struct(raw.hardware.slurm.additional, False)  # free-form sbatch options
    try:
        merged = OmegaConf.merge(raw, *layers)
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        err = explain_hydra_error(exc)
        raise ConfigError(f"site:{err.key}", f"{err.message} (in site file {path})") from None
    cli = [ov for ov in parse_overrides(overrides) if ov.key_or_group.startswith("hardware.")]
    apply_value_overrides(merged, cli)  # the command line wins over the site file
    return merged


def load_config(overrides: Sequence[str], name_parts: Sequence[str] = (), resolve_paths: bool = True,
                check_paths: bool = True) -> Config:
    """Compose, convert to dataclasses once, fill derived values, validate (the run folder's
    paths too unless check_paths is false: resume.start_config checks them once it knows
    whether the folder is a run to resume)."""
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
        cfg = derive_processes(cfg)
        cfg = replace(cfg, trainer=replace(cfg.trainer, grad_accum=cfg.trainer.grad_accum or derive_grad_accum(cfg.trainer, cfg.hardware)))
    validate(cfg)
    if resolve_paths and check_paths:
        validate_run_paths(cfg.run)
    return cfg

# ---------------------------------------------------------------- derived values and naming (composition owns them)


def derive_processes(cfg: "Config") -> "Config":
    """How a node's GPUs are split: training processes use GPUs 0..P-1 (torchrun ranks), scoring
    models that name a GPU (reward_model.gpu, judge.gpu) take the GPUs they name. When
    hardware.processes is unset on cuda, P = gpus_per_node minus the distinct GPUs named by
    scoring models (at least 1), e.g. 2 GPUs with reward_model.gpu=1: one training process on
    GPU 0, the reward model on GPU 1; trainer=rm runs one process. validation checks that no named GPU is a training rank's
    (unless P is 1 and it names GPU 0, the same GPU). Pure: returns a copy."""
    hw = cfg.hardware
    named = set(scoring_gpus(cfg).values())
    if hw.processes is not None or hw.device != Device.cuda:
        return cfg
    if cfg.trainer.algo == Algo.rm:  # trains one reward model in one process
        return replace(cfg, hardware=replace(hw, processes=1))
    if not named:
        return cfg
    processes = max(1, hw.gpus_per_node - len(named))
    return replace(cfg, hardware=replace(hw, processes=processes))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120]


def default_run_name(cfg: Config, extra: List[str] = ()) -> str:
    parts = [cfg.trainer.algo.value, cfg.model.name, cfg.hardware.name, *extra]
    return slug("-".join(parts))


def resolve(cfg: Config, extra_name_parts: List[str] = (), now: Optional[_dt.datetime] = None) -> Config:
    """Fill the derived fields (grad_accum, run name/sweep/dir). Pure: returns a copy."""
    cfg = derive_processes(cfg)  # before grad_accum: it divides by the training processes
    # A user-typed grad_accum is kept so validate() can reject it when it disagrees.
    grad_accum = cfg.trainer.grad_accum or derive_grad_accum(cfg.trainer, cfg.hardware)
    trainer = replace(cfg.trainer, grad_accum=grad_accum)
    sweep = cfg.run.sweep or (now or _dt.datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    name = cfg.run.name or default_run_name(cfg, list(extra_name_parts))
    run_dir = os.path.abspath(cfg.run.dir or f"{cfg.run.results_dir}/{sweep}/{name}")
    return replace(cfg, trainer=trainer, run=replace(cfg.run, sweep=sweep, name=name, dir=run_dir))


def config_yaml(cfg: Config) -> str:
    """The resolved config as the YAML a run folder keeps (config.yaml)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))



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
            named = key not in ("model", "trainer", "hardware")
            # name part: the last key component and the value (`learning_rate=0.0001`, not `0001`)
            axes.append([(f"{key}={v}", f"{key.split('.')[-1]}={v}" if named else None) for v in ov.sweep_string_iterator()])
        else:
            axes.append([(ov.input_line, None)])
    runs = []
    for combo in itertools.product(*axes):
        runs.append(([o for o, _ in combo], [part for _, part in combo if part]))
    return runs


def hydra_quote(value: str) -> str:
    """`value` as a Hydra override value that parses back to exactly `value` and is
    never interpolated: double-quoted when nothing needs escaping, else single-quoted
    with quotes and the backslashes before them escaped and `${` escaped (a folder named
    `${oc.env:HF_TOKEN}` stays text)."""
    text = str(value)
    if not any(c in text for c in ('"', "\\", "${")):
        return f'"{text}"'  # nothing to escape: the readable form
    text = text.replace("${", "\\${")
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return f"'{text}'"


def split_argv(argv: Sequence[str]) -> Tuple[bool, List[str]]:
    """(multirun?, overrides) from argv; -m/--multirun may appear anywhere."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    rest = [a for a in argv if a not in ("-m", "--multirun")]
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        raise UsageError(f"unknown option {flags[0]!r}; usage: [-m] [--cfg job] [-h] key=value ... (see --help)")
    return multirun, rest


def print_composed(args: Sequence[str], preset: Sequence[str] = (), resolve_paths: bool = True) -> None:
    """`--cfg job`: the composed, validated config of every run of the command line (one
    YAML document per run of a sweep, as the run's config.yaml would hold it); nothing runs."""
    multirun, overrides = split_argv(args)
    if resolve_paths and not any(o.split("=")[0].lstrip("+") == "run.sweep" for o in overrides):  # one sweep, as launch names it
        overrides = [*overrides, f"run.sweep={_dt.datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"]
    combos = expand_sweep([*preset, *overrides]) if multirun else [([*preset, *overrides], [])]
    for i, (ovs, parts) in enumerate(combos):
        cfg = load_config(ovs, parts, resolve_paths=resolve_paths)
        if len(combos) > 1:
            print(f"# run {i}: {' '.join(ovs)}")
        print(config_yaml(cfg), end="\n" if len(combos) > 1 else "", flush=True)


def command_help(main: Callable, overrides: bool, preset: Sequence[str] = (), multirun: bool = True) -> str:
    """--help of the command whose main() this is (finellama_rl/cli_help.py writes it)."""
    from finellama_rl.cli_help import command_help as text

    module = sys.modules.get(main.__module__)
    spec = getattr(module, "__spec__", None)
    prog = spec.name if spec is not None and spec.name != "__main__" else main.__module__
    defaults = None
    if overrides:
        try:  # the default composition's values (as the command would compose them without overrides)
            defaults = load_config(list(preset), resolve_paths=False)
        except FinellamaError:
            defaults = None
    return text(getattr(module, "__doc__", None) or "", prog, overrides, CONF_DIR, defaults, multirun, preset)


def cli_main(main: Callable[[List[str]], Optional[int]], argv: Optional[Sequence[str]] = None, overrides: bool = False,
             preset: Sequence[str] = (), multirun: bool = True, resolve_paths: bool = True) -> None:
    """Run an entry point; the project's errors (finellama_rl.errors) print one line and
    exit with their code (2 for bad input). Every command answers `-h`/`--help`; commands
    whose arguments are config overrides (`overrides`: launch, train, plan, prefetch, demo
    with its `preset`) also answer `--cfg job` with the composed config, and nothing runs."""
    from finellama_rl.cli_help import cfg_flag

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if any(a in ("-h", "--help") for a in args):
            print(command_help(main, overrides, preset, multirun), flush=True)
            sys.exit(0)
        rest = cfg_flag(args) if overrides else None
        if rest is not None:
            print_composed(rest, preset, resolve_paths)
            sys.exit(0)
        code = main(args)
    except FinellamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exit_code(exc))
    except BrokenPipeError:  # `... --help | head`: the reader left; no traceback (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code or 0)
