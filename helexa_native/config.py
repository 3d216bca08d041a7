"""The normalized description of a model that every loader produces.

Loaders turn a GGUF file or a Hugging Face folder into one `ModelSource`:
a `ModelConfig` (architecture and dimensions), named raw tensors (still in
their stored dtype or GGUF block type), tokenizer material, chat template and
generation config. Backends consume this and nothing else.

Tensor names are GGUF's canonical names for both formats:
    token_embd.weight, output_norm.weight, output.weight (absent when tied),
    rope_freqs.weight (Llama-3 GGUFs), and per layer i:
    blk.{i}.attn_norm.weight, blk.{i}.attn_q.weight, blk.{i}.attn_k.weight,
    blk.{i}.attn_v.weight, blk.{i}.attn_output.weight,
    blk.{i}.attn_q.bias / attn_k.bias / attn_v.bias (qwen2),
    blk.{i}.attn_q_norm.weight / attn_k_norm.weight (qwen3),
    blk.{i}.ffn_norm.weight, blk.{i}.ffn_gate.weight, blk.{i}.ffn_up.weight,
    blk.{i}.ffn_down.weight.
Mixture-of-experts layers (qwen3moe) replace the three ffn matrices with a
router and the experts' matrices stacked on a leading expert axis, as GGUF
stores them (HF checkpoints' per-expert tensors are stacked by the loader):
    blk.{i}.ffn_gate_inp.weight [num_experts, hidden] (the router),
    blk.{i}.ffn_gate_exps.weight, blk.{i}.ffn_up_exps.weight
        [num_experts, moe_intermediate_size, hidden],
    blk.{i}.ffn_down_exps.weight [num_experts, hidden, moe_intermediate_size].
Shapes are in torch order: a linear weight is [out_features, in_features].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe")
# Architectures whose layers route tokens to experts.
MOE_ARCHS = ("qwen3moe",)


@dataclass
class ModelConfig:
    """Architecture and dimensions of a llama-family decoder."""

    arch: str  # "llama" | "qwen2" | "qwen3" | "qwen3moe"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # "half": rotate_half pairs (i, i + head_dim/2), as in HF checkpoints and
    # qwen GGUFs. "pairs": adjacent pairs (2i, 2i+1), as llama GGUFs need
    # because their converter permutes q/k rows; the two are equivalent on
    # the weights they come with.
    rope_style: str = "half"
    # None, {"type": "linear", "factor": f} or {"type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry biases (qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (qwen3)
    # Mixture of experts (qwen3moe); num_experts 0 means every layer is dense.
    # A MoE layer routes each token to num_experts_per_tok of num_experts
    # SwiGLU experts of width moe_intermediate_size; norm_topk_prob rescales
    # the chosen experts' router probabilities to sum to one. Layers listed
    # in mlp_only_layers (sorted) keep a dense FFN of intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    mlp_only_layers: tuple = ()
    name: str = ""

    def __post_init__(self) -> None:
        if self.rope_style not in ("half", "pairs"):
            raise ValueError(f"rope_style must be 'half' or 'pairs', got {self.rope_style!r}")
        self.mlp_only_layers = tuple(sorted(int(i) for i in self.mlp_only_layers))

    def is_moe_layer(self, layer: int) -> bool:
        """True when `layer` runs the mixture-of-experts FFN."""
        return self.num_experts > 0 and layer not in self.mlp_only_layers

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class RawTensor:
    """One named weight as stored: a host buffer plus its type and logical shape.

    `data` is a numpy array over the file's bytes (memory-mapped where the
    source allows): uint8 raw blocks for GGUF block types, float32 / float16 /
    uint16-viewed bfloat16 for plain types. `to_float()` gives a float32 torch
    tensor of `shape` (dequantizing as needed).
    """

    name: str
    shape: tuple
    dtype: str  # a ggml_types name: FLOAT_TYPES or QUANT_TYPES
    data: Any
    dequantize: Optional[Callable[["RawTensor"], Any]] = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def to_float(self):
        """float32 torch tensor of `shape`."""
        if self.dequantize is None:
            raise RuntimeError(f"tensor {self.name} has no dequantizer")
        return self.dequantize(self)


@dataclass
class TokenizerSource:
    """Where a tokenizer comes from.

    kind "gguf": `gguf_meta` holds the `tokenizer.ggml.*` fields with that
    prefix stripped (model, pre, tokens, token_type, merges, scores,
    bos_token_id, eos_token_id, eos_token_ids?, padding_token_id,
    unknown_token_id, add_bos_token, add_eos_token), plain Python values.
    kind "hf": `hf_dir` holds tokenizer.json and tokenizer_config.json.
    """

    kind: str
    gguf_meta: Optional[dict] = None
    hf_dir: Optional[Path] = None


@dataclass
class ModelSource:
    """Everything a loader read from one model: config, tensors, tokenizer, template."""

    path: Path
    format: str  # "gguf" | "safetensors"
    config: ModelConfig
    tensors: dict  # name -> RawTensor
    tokenizer: TokenizerSource
    chat_template: Optional[str] = None
    generation_config: dict = field(default_factory=dict)
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # extra facts for `info`
    _closers: list = field(default_factory=list, repr=False)

    def close(self) -> None:
        """Release file handles and maps held by the tensors."""
        for fn in self._closers:
            try:
                fn()
            except Exception:
                pass
        self._closers.clear()
