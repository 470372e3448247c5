"""The frozen scoring models (reward_model, judge) in the memory plan, per GPU, and the
seeds' kind of table: for a list of batch sizes, the predicted total per GPU for each GPU
profile, with a verdict.

    python -m finellama_rl.plan experiment=judge_7b_14b --batches 1,2,4,8,16
    python -m finellama_rl.plan experiment=dev_0p5b --batches 32,64,128,256

A batch size b means b sequences per training process per step, generated, scored and
trained at once (trainer.micro_batch = b, trainer.prompts_per_step = b x processes /
num_generations, as a TRL user's per_device_train_batch_size with no accumulation); the
scorers work in chunks of min(their batch_size, b). Totals are at rung 0 (no step-down):
what the setting costs as written. Verdicts: `fits` within (1 - ladder.planner_margin) of
every GPU it uses, `tight` within the card but not the margin, `NO` over the card.
Pure: no torch import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from finellama_rl.config import Config, Device, ModelConfig, processes_per_node, scoring_sources, world_size
from finellama_rl.errors import ConfigError
from finellama_rl.login.memory import GIB, ModelShape
from finellama_rl.login.memory_scoring import ScoringInputs, scoring_bytes


@dataclass(frozen=True)
class ScoringPart:
    name: str  # reward_model | judge
    gpu: Optional[int]  # None: on every training process's own GPU
    bytes: Dict[str, int]  # weights, transient, overhead

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def _shape(m: ModelConfig) -> ModelShape:
    return ModelShape(params=int(m.params_b * 1e9), hidden_size=m.hidden_size, num_layers=m.num_layers,
                      num_attention_heads=m.num_attention_heads, num_kv_heads=m.num_kv_heads,
                      intermediate_size=m.intermediate_size, vocab_size=m.vocab_size, tie_embeddings=m.tie_embeddings)


def _on_own_gpu(cfg: Config, gpu: Optional[int]) -> bool:
    return gpu is not None and gpu >= processes_per_node(cfg.hardware)


def scoring_parts(cfg: Config, batch: Optional[int] = None) -> List[ScoringPart]:
    """The scoring models the run loads, sized at their batch (capped at `batch`, the
    sequences per process per step, when given)."""
    t, parts = cfg.trainer, []
    compute = 2 if cfg.hardware.bf16 else 4
    for name in scoring_sources(t):
        section = getattr(cfg, name)
        if section.model is None:  # validation requires it; planning a partial config shows nothing
            continue
        n = min(section.batch_size, batch) if batch else section.batch_size
        if name == "reward_model":
            tokens = min(section.max_tokens, t.max_prompt_tokens + t.max_completion_tokens)
            inp = ScoringInputs(_shape(section.model), name, section.quantization.value, compute, n, tokens,
                                prm=section.kind.value == "prm")
        else:  # the judge reads question, completion, optionally the reference, and the instructions
            tokens = t.max_prompt_tokens + t.max_completion_tokens * (2 if section.use_reference else 1) + 64
            inp = ScoringInputs(_shape(section.model), name, section.quantization.value, compute, n,
                                min(section.max_input_tokens, tokens), section.max_new_tokens)
        parts.append(ScoringPart(name, section.gpu if _on_own_gpu(cfg, section.gpu) else None,
                                 scoring_bytes(inp, _on_own_gpu(cfg, section.gpu))))
    return parts


def shared_bytes(parts: Sequence[ScoringPart]) -> int:
    """Bytes the scorers take on each training process's GPU (what the policy cannot use)."""
    return sum(p.total for p in parts if p.gpu is None)


def per_gpu_bytes(policy_peak: int, parts: Sequence[ScoringPart]) -> Dict[int, int]:
    """{GPU: predicted bytes}; GPU 0 stands for every training process's GPU."""
    totals = {0: policy_peak + shared_bytes(parts)}
    for p in parts:
        if p.gpu is not None:
            totals[p.gpu] = totals.get(p.gpu, 0) + p.total
    return totals


def verdict(totals: Dict[int, int], gpu_mem_gb: float, margin: float) -> str:
    worst = max(totals.values()) / (gpu_mem_gb * GIB)
    return "fits" if worst <= 1 - margin else ("tight" if worst <= 1 else "NO")


def format_parts(parts: Sequence[ScoringPart]) -> str:
    lines = []
    for p in parts:
        where = f"GPU {p.gpu} (its own)" if p.gpu is not None else "each training GPU (shared with the policy)"
        b = p.bytes
        lines.append(f"{p.name}: {p.total / GIB:.2f} GiB on {where}: weights {b['weights'] / GIB:.2f}, "
                     f"scoring {b['transient'] / GIB:.2f}, overhead {b['overhead'] / GIB:.2f}")
    return "\n".join(lines)


def parse_batches(argv: Sequence[str]) -> Tuple[List[str], List[int]]:
    """(argv without --batches, the batch sizes) from `--batches 1,2,4` or `--batches=1,2,4`."""
    rest, batches, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == "--batches" or a.startswith("--batches="):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in a else 2
            try:
                batches = [int(x) for x in value.split(",") if x.strip()]
            except ValueError:
                raise ConfigError("--batches", f"expected comma-separated integers, got {value!r}") from None
            if not batches or min(batches) < 1:
                raise ConfigError("--batches", f"expected positive integers, got {value!r}")
            continue
        rest.append(a)
        i += 1
    return rest, batches


def _cell(overrides: List[str], profile: str, b: int, policy_peak: Callable[[Config], int]) -> str:
    from finellama_rl.compose import load_config

    try:
        gpus = load_config([f"hardware={profile}"], resolve_paths=False).hardware.gpus_per_node
        base = load_config([*overrides, f"hardware={profile}", "trainer.micro_batch=1",  # any valid batch: for the split
                            f"trainer.prompts_per_step={max(1, gpus)}", "trainer.generation_batch=0"], resolve_paths=False)
        procs, g = world_size(base.hardware), base.trainer.num_generations
        if (b * procs) % g:
            return f"n/a ({g} generations)"
        cfg = load_config([*overrides, f"hardware={profile}", f"trainer.micro_batch={b}",
                           f"trainer.prompts_per_step={b * procs // g}", "trainer.generation_batch=0"], resolve_paths=False)
    except ConfigError as exc:
        return f"n/a ({exc.key})"
    totals = per_gpu_bytes(policy_peak(cfg), scoring_parts(cfg, b))
    text = " + ".join(f"{v / GIB:.1f}" for _, v in sorted(totals.items()))
    return f"{text} {verdict(totals, cfg.hardware.gpu_mem_gb, cfg.ladder.planner_margin)}"


def batch_table(overrides: Sequence[str], batches: Sequence[int], policy_peak: Callable[[Config], int],
                profiles: Optional[Sequence[str]] = None) -> str:
    """Rows: batch sizes; columns: GPU profiles; cells: predicted GiB per GPU used (GPU 0 +
    GPU 1 ...) and the verdict. `policy_peak(cfg)`: the policy's predicted peak at rung 0
    (plan.py passes memory.py's estimate)."""
    from finellama_rl.compose import CONF_DIR, load_config

    overrides = [o for o in overrides if not o.startswith("hardware=")]
    if profiles is None:
        profiles = []
        for p in sorted(f.stem for f in (CONF_DIR / "hardware").glob("*.yaml")):
            hw = load_config([f"hardware={p}"], resolve_paths=False).hardware
            if hw.device == Device.cuda:
                profiles.append(p)
    header = ["batch"] + [f"{p} ({load_config([f'hardware={p}'], resolve_paths=False).hardware.gpu_mem_gb:g} GiB)" for p in profiles]
    rows = [header] + [[str(b)] + [_cell(list(overrides), p, b, policy_peak) for p in profiles] for b in batches]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
