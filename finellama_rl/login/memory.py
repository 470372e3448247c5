"""Memory planner: predicts the peak GPU memory of one RL training step.

Why: each OOM on a SLURM node costs a resubmission and a day of queue time. From
config values only (model shape, batch/length setting, LoRA, quantization) this
module predicts the peak bytes of one PPO or GRPO step with a 4-bit (NF4, double
quant) or 16-bit base plus LoRA, broken down by component, and ``plan_rung``
picks the first rung of the OOM ladder (``finellama_rl.ladder.rungs``) predicted to fit.

Phase model (the key assumption): a step has a generation phase (sampling with a
KV cache, no grad) and a training phase (forward + backward of one micro batch).
They do not overlap, and PyTorch's caching allocator reuses the blocks freed by
one phase for the other, so the peak is
    static + max(generation transient, training transient), plus overhead,
NOT static + both. ``MemoryEstimate.peak_components`` names the components that
sum to ``peak_bytes``; the other phase's component is reported but not summed.
Scoring passes (reference/old log-probs, values) run under no_grad at micro-batch
size: their logits plus one layer's working set are below the training phase.

Precision: the per-layer activation formula was checked against the tensors
autograd saves in a real Qwen2 + PEFT model (see _layer_bytes_per_token and
tests/test_memory.py). Elsewhere the estimate leans conservative (logits for every
position, sequences padded to the max length, grads counted between steps) because
an underestimate costs a day while an overestimate costs some throughput.
Pure module: no torch import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from finellama_rl.ladder.rungs import Rung, Setting

__all__ = [
    "ModelShape", "MemoryInputs", "MemoryEstimate", "QWEN2_5_SHAPES", "LORA_TARGETS",
    "estimate_memory", "plan_rung", "format_estimate",
]

GIB = 1024 ** 3
# bitsandbytes NF4: 4 bits per weight + one absmax per block of 64 weights. With double
# quant the absmax is stored in 8 bits with an fp32 second-level constant per 256 blocks;
# without it the absmax is fp32.
NF4_BYTES_DOUBLE_QUANT = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_BYTES_SINGLE_QUANT = 0.5 + 4 / 64
# PEFT (prepare_model_for_kbit_training) keeps trainable params in fp32; AdamW holds
# exp_avg and exp_avg_sq in fp32; grads match the fp32 params. No separate master copy.
TRAINABLE_PARAM_BYTES = 4
GRAD_AND_ADAM_BYTES = 4 + 4 + 4
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STATIC = ("weights_4bit", "embeddings_and_head", "lora_params", "grads_and_optimizer",
          "value_head", "rollout_buffers")
PHASES = {"training": ("activations", "logits"), "generation": ("kv_cache",)}
OVERHEAD = "cuda_context_and_overhead"


@dataclass(frozen=True)
class ModelShape:
    params: int  # total parameter count (embeddings counted once when tied)
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


QWEN2_5_SHAPES: Dict[str, ModelShape] = {
    "0.5B": ModelShape(490_000_000, 896, 24, 14, 2, 4864, 151936, True),
    "1.5B": ModelShape(1_540_000_000, 1536, 28, 12, 2, 8960, 151936, True),
    "3B": ModelShape(3_090_000_000, 2048, 36, 16, 2, 11008, 151936, True),
    "7B": ModelShape(7_600_000_000, 3584, 28, 28, 4, 18944, 152064, False),
    "14B": ModelShape(14_700_000_000, 5120, 48, 40, 8, 13824, 152064, False),
}


@dataclass(frozen=True)
class MemoryInputs:
    shape: ModelShape
    algo: str  # "grpo" | "ppo"
    setting: Setting
    lora_r: int
    lora_target_modules: Tuple[str, ...]
    quantized: bool  # 4-bit NF4 base; False: base linears in compute dtype
    compute_bytes: int  # 2 for bf16/fp16, 4 for fp32
    beta: float  # KL coef; > 0 stores reference log-probs (adapter disabled, no 2nd model)
    # Sequences decoded at once. Default None -> setting.generation_batch (the ladder's
    # generation knob: trainer.generation_batch, PPO's whole rollout or TRL's whole step
    # by default), or setting.micro_batch when the setting does not model it. Trap: the
    # batch rungs do NOT shrink it; the ladder's generation cuts (step_down) and length
    # rungs do.
    generation_batch: Optional[int] = None
    lora_dropout: float = 0.05  # > 0: PEFT saves a dropped-out input copy per target module
    autocast: bool = True  # forward under autocast; False with fp32 adapters -> fp32 input copies
    value_head: str = "shared"  # PPO: "shared" linear head | "adapter" 2nd LoRA on the base
    completion_logits_only: bool = False  # lm_head on completion positions only
    # TRL >= 1.16 GRPO: per-token log-probs through its chunked fused lm_head; the (tokens, vocab)
    # logits are never materialised (see _fused_logprob_bytes)
    fused_logprobs: bool = False
    double_quant: bool = True
    quant_bits: int = 4  # 8: LLM.int8 base (1 byte per weight + fp32 row scales) instead of NF4
    context_bytes: int = 768 * 1024 ** 2  # CUDA context, cuBLAS workspaces, kernels
    fragmentation: float = 0.10  # caching-allocator slack, fraction of the phase's tensors

    def __post_init__(self) -> None:
        if self.algo not in ("grpo", "ppo"):
            raise ValueError(f"algo must be 'grpo' or 'ppo', got {self.algo!r}")
        if self.algo == "ppo" and self.setting.num_generations != 1:
            raise ValueError("PPO samples one completion per prompt: num_generations must be 1")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        unknown = set(self.lora_target_modules) - set(LORA_TARGETS)
        targets = self.lora_target_modules
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"lora_target_modules must be distinct names from {LORA_TARGETS}, got {targets}")
        if self.compute_bytes not in (2, 4):
            raise ValueError(f"compute_bytes must be 2 or 4, got {self.compute_bytes}")
        if self.value_head not in ("shared", "adapter"):
            raise ValueError(f"value_head must be 'shared' or 'adapter', got {self.value_head!r}")
        if self.generation_batch is not None and self.generation_batch < 1:
            raise ValueError("generation_batch must be >= 1")

    @property
    def gen_batch(self) -> int:
        if self.generation_batch is not None:
            return self.generation_batch
        return self.setting.generation_batch or self.setting.micro_batch


@dataclass(frozen=True)
class MemoryEstimate:
    components: Dict[str, int]  # bytes per component (both phases' transients reported)
    peak_bytes: int  # == sum(components[k] for k in peak_components)
    phase: str  # "training" or "generation": the phase that sets the peak
    peak_components: Tuple[str, ...]


def _linear_dims(s: ModelShape) -> Dict[str, Tuple[int, int]]:
    """(in_features, out_features) of each decoder-layer linear (Qwen2/Llama layout)."""
    h, kv, inter = s.hidden_size, s.kv_dim, s.intermediate_size
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def _embedding_params(s: ModelShape) -> int:
    return s.vocab_size * s.hidden_size * (1 if s.tie_embeddings else 2)


def _linear_params(s: ModelShape) -> int:
    return s.num_layers * sum(i * o for i, o in _linear_dims(s).values())


def _base_weight_bytes(inp: MemoryInputs) -> int:
    """Decoder linears (NF4 or compute dtype) + small leftovers + one dequant buffer.

    Leftover params (norms, q/k/v biases) = params - linears - embeddings; bitsandbytes
    keeps them in the compute dtype. When quantized, bnb dequantizes one weight matrix
    at a time (backward; batched inference), so the largest one is added once.
    """
    s, b = inp.shape, inp.compute_bytes
    linear = _linear_params(s)
    leftover = max(0, s.params - linear - _embedding_params(s))
    if not inp.quantized:
        return linear * b + leftover * b
    per_param = NF4_BYTES_DOUBLE_QUANT if inp.double_quant else NF4_BYTES_SINGLE_QUANT
    if inp.quant_bits == 8:
        per_param = 1 + 4 / min(i for i, _ in _linear_dims(s).values())  # int8 + an fp32 scale per row (upper bound)
    dequant = max(i * o for i, o in _linear_dims(s).values()) * b
    return int(linear * per_param) + leftover * b + dequant


def _lora_param_count(inp: MemoryInputs) -> int:
    dims = _linear_dims(inp.shape)
    per_layer = sum(inp.lora_r * (dims[m][0] + dims[m][1]) for m in inp.lora_target_modules)
    return per_layer * inp.shape.num_layers


# Targets that read the same input tensor (q/k/v read the normed attention input,
# gate/up the normed MLP input); without private copies it is saved once per group.
_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def _lora_bytes_per_token(inp: MemoryInputs) -> int:
    """LoRA-path tensors saved per token per layer.

    Frozen base matmuls (bnb MatMul4Bit, or a frozen 16-bit weight) save NO input: autograd
    keeps a matmul's input only to compute the weight's gradient. So the inputs of the
    targeted linears are kept alive only by the LoRA A matmuls:
    - autocast on (HF/accelerate bf16=True): PEFT does not cast; with dropout 0 the
      input is shared by the group's targets, so it is saved once per input group.
    - autocast off with fp32 adapters: PEFT casts the input to fp32 per target, a
      private 4-byte copy each (trap: ~doubles the LoRA-path memory).
    - dropout > 0 (GPU fused dropout): a private dropped-out copy per target plus a
      1-byte mask, even for q/k/v that share an input.
    Plus A's output (r values) per target, saved by the B matmul.
    """
    b = inp.compute_bytes
    a = b if inp.autocast else TRAINABLE_PARAM_BYTES  # dtype the adapter computes in
    dims = _linear_dims(inp.shape)
    targets = set(inp.lora_target_modules)
    total = len(targets) * a * inp.lora_r
    if inp.lora_dropout > 0:
        return total + sum(dims[m][0] * (a + 1) for m in targets)
    if a != b:
        return total + sum(dims[m][0] * a for m in targets)
    return total + sum(dims[g[0]][0] * b for g in _INPUT_GROUPS if targets & set(g))


def _layer_bytes_per_token(inp: MemoryInputs) -> int:
    """Tensors one decoder layer saves for backward, per token, without checkpointing.

    Checked against the storages autograd saves in a CPU Qwen2 + PEFT model
    (transformers 5.23, peft 0.21, SDPA, dropout 0): within 0.2% per layer for fp32
    adapters and for q/v-only targets; +3% with all targets and no input copies,
    because the o_proj input counted here is a view of the SDPA output on fused
    kernels (a copy on the math path). GPU dropout masks are reasoned, not measured.
    - 2 RMSNorms: Qwen2RMSNorm saves its fp32-upcast input (4h each); the frozen norm
      weight's multiply saves nothing.
    - attention (SDPA/flash; eager attention would add heads*seq^2 per layer): q, k, v
      and the output; k/v at kv width (GQA native; a repeat_kv path would widen them).
    - MLP: gate (SiLU input), silu(gate) and up (the product's inputs) -> 3 * intermediate.
    - LoRA path: see _lora_bytes_per_token.
    """
    s, b = inp.shape, inp.compute_bytes
    norms = 2 * 4 * s.hidden_size
    attention = b * (2 * s.hidden_size + 2 * s.kv_dim)
    mlp = 3 * b * s.intermediate_size
    return norms + attention + mlp + _lora_bytes_per_token(inp)


def _backbone_activation_bytes(inp: MemoryInputs) -> int:
    """Saved activations of one micro batch through all layers + the final norm.

    Under activation checkpointing (HF per-decoder-layer) only each layer's input
    (b*h per token) is kept, plus ONE layer's full set while it is recomputed in
    backward. Tokens = micro_batch * max_seq_len: batches are padded to the max.
    """
    s, st, b = inp.shape, inp.setting, inp.compute_bytes
    tokens = st.micro_batch * st.max_seq_len
    layer = _layer_bytes_per_token(inp)
    if st.activation_checkpointing:
        per_token = s.num_layers * b * s.hidden_size + layer
    else:
        per_token = s.num_layers * layer
    final_norm = 4 * s.hidden_size  # fp32 input; the frozen lm_head saves no input
    return tokens * (per_token + final_norm)


def _value_path_bytes(inp: MemoryInputs) -> int:
    """PPO value-path activations alive at the policy backward.

    shared: the fp32 head reads an fp32 copy of the last hidden state (4h per token).
    adapter: the critic's forward and backward run after the policy's backward
    (finellama_rl/trainers/value_head.py), so its graph (backbone + 4h head) never
    coexists with the policy graph and is smaller (no vocab logits): adds nothing.
    A trainer that sums both losses into one backward would need the backbone twice.
    """
    if inp.algo != "ppo" or inp.value_head == "adapter":
        return 0
    return inp.setting.micro_batch * inp.setting.max_seq_len * 4 * inp.shape.hidden_size


# trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE and trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
# (TRL 1.16; tests/test_memory.py checks them against the installed TRL)
FUSED_TILE_TOKENS, FUSED_TILE_VOCAB = 4096, 32768


def _fused_logprob_bytes(inp: MemoryInputs) -> int:
    """TRL 1.16 GRPO (`model(..., labels=, fused_lm_head=True)`, ChunkedLogProbFunction): the
    lm_head runs on the completion positions only (on CUDA, with Triton) in tiles of
    FUSED_TILE_TOKENS x FUSED_TILE_VOCAB in compute dtype, folded into per-token online
    log-sum-exp statistics; backward recomputes each tile. Alive at the peak: one tile, the
    saved completion hidden states (compute dtype), their fp32 gradient, and a few fp32
    per-token vectors (log-prob, log Z, entropy, their gradients)."""
    st, s, b = inp.setting, inp.shape, inp.compute_bytes
    n = st.micro_batch * st.max_completion_tokens
    tile = min(n, FUSED_TILE_TOKENS) * min(s.vocab_size, FUSED_TILE_VOCAB) * b
    return tile + n * s.hidden_size * (b + 4) + n * 4 * 6


def _logits_bytes(inp: MemoryInputs) -> int:
    """Full-vocab logits of one micro batch: the lm_head output in compute dtype, its
    fp32 upcast (/ temperature), and one more fp32 tensor (log_softmax output / its
    gradient in backward). Positions: the whole sequence unless completion_logits_only
    (the lm_head applied to completion positions only, as value_head.forward_completion
    and TRL's logits_to_keep do)."""
    if inp.fused_logprobs:
        return _fused_logprob_bytes(inp)
    st = inp.setting
    positions = st.max_completion_tokens if inp.completion_logits_only else st.max_seq_len
    return st.micro_batch * positions * inp.shape.vocab_size * (inp.compute_bytes + 4 + 4)


def _generation_bytes(inp: MemoryInputs) -> int:
    """KV cache plus decoding working set, the larger of two moments (HF generate):

    - prefill: KV for the prompts + one layer's no-grad working set for all prompt
      tokens (residual, normed input, gate/up/act: b*(2h + 3I)); HF computes logits
      only for the last position (logits_to_keep=1).
    - last decode step: KV for the full sequence + fp32 next-token logits, processed
      scores and sampling probabilities (3 * vocab * 4 per sequence).
    Each sampled sequence has its own cache (prompts are repeated per generation).
    """
    s, st, b, n = inp.shape, inp.setting, inp.compute_bytes, inp.gen_batch
    kv_per_token = s.num_layers * 2 * s.kv_dim * b
    prefill = n * st.max_prompt_tokens * (kv_per_token + b * (2 * s.hidden_size + 3 * s.intermediate_size))
    decode = n * st.max_seq_len * kv_per_token + n * s.vocab_size * 4 * 3
    return max(prefill, decode)


def _value_head_param_bytes(inp: MemoryInputs) -> int:
    if inp.algo != "ppo":
        return 0
    params = inp.shape.hidden_size + 1
    if inp.value_head == "adapter":
        params += _lora_param_count(inp)
    return params * (TRAINABLE_PARAM_BYTES + GRAD_AND_ADAM_BYTES)


def _rollout_bytes(inp: MemoryInputs) -> int:
    """Per-step rollout tensors kept on the GPU for the effective batch: input ids and
    attention mask (int64) per position, plus fp32 per-completion-token arrays: GRPO
    old log-probs (+ reference log-probs when beta > 0); PPO old log-probs, values,
    rewards, advantages, returns (+ reference log-probs when beta > 0)."""
    st = inp.setting
    per_token_arrays = (1 if inp.algo == "grpo" else 5) + (1 if inp.beta > 0 else 0)
    return st.effective_batch * (st.max_seq_len * 16 + st.max_completion_tokens * 4 * per_token_arrays)


def estimate_memory(inp: MemoryInputs) -> MemoryEstimate:
    """Predicted peak bytes of one step and its breakdown (see module docstring)."""
    s, b = inp.shape, inp.compute_bytes
    lora = _lora_param_count(inp)
    c: Dict[str, int] = {
        "weights_4bit": _base_weight_bytes(inp),  # key kept when unquantized (16-bit base)
        "embeddings_and_head": _embedding_params(s) * b,  # not quantized by bnb
        "lora_params": lora * TRAINABLE_PARAM_BYTES,
        # Counted in both phases: optimizer states persist; grads (set_to_none between
        # steps) are counted too (conservative, small for LoRA).
        "grads_and_optimizer": lora * GRAD_AND_ADAM_BYTES,
        "value_head": _value_head_param_bytes(inp),
        "rollout_buffers": _rollout_bytes(inp),
        "activations": _backbone_activation_bytes(inp) + _value_path_bytes(inp),
        "logits": _logits_bytes(inp),
        "kv_cache": _generation_bytes(inp),
    }
    static = sum(c[k] for k in STATIC)
    totals = {phase: static + sum(c[k] for k in keys) for phase, keys in PHASES.items()}
    phase = max(totals, key=lambda p: totals[p])  # ties -> "training" (dict order)
    c[OVERHEAD] = inp.context_bytes + int(inp.fragmentation * totals[phase])
    peak_components = STATIC + PHASES[phase] + (OVERHEAD,)
    return MemoryEstimate(c, sum(c[k] for k in peak_components), phase, peak_components)


def plan_rung(ladder: List[Rung], make_inputs: Callable[[Setting], MemoryInputs],
              gpu_mem_bytes: int, margin: float = 0.10) -> Tuple[int, MemoryEstimate]:
    """First (largest) rung whose predicted peak <= (1 - margin) * gpu_mem_bytes.

    Returns the last rung (and its estimate) when none fits; the caller warns. Rungs
    are scanned in ladder order, not bisected: peaks need not be monotone along the
    ladder (e.g. a TRL-style generation batch does not shrink on batch rungs).
    """
    if not ladder:
        raise ValueError("empty ladder")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    budget = (1.0 - margin) * gpu_mem_bytes
    est = None
    for rung in ladder:
        est = estimate_memory(make_inputs(rung.setting))
        if est.peak_bytes <= budget:
            return rung.index, est
    return ladder[-1].index, est


def format_estimate(est: MemoryEstimate) -> str:
    """A GiB table; '*' marks the components summed into the peak (the other phase's
    transient is shown unmarked)."""
    width = max(len(k) for k in est.components) + 2
    lines = [f"{'component':<{width}}  {'GiB':>9}"]
    for name, value in est.components.items():
        mark = "*" if name in est.peak_components else " "
        lines.append(f"{name:<{width}}  {value / GIB:>9.3f} {mark}")
    lines.append(f"{'peak (' + est.phase + ')':<{width}}  {est.peak_bytes / GIB:>9.3f}")
    return "\n".join(lines)
