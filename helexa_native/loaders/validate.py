"""The tensors a config implies, and the check that a source holds them all."""

from __future__ import annotations

import math

from ..config import ModelConfig
from ..errors import ModelLoadError

ROPE_FREQS = "rope_freqs.weight"


def expected_shapes(cfg: ModelConfig) -> dict:
    """Canonical tensor name -> torch-order shape for every weight `cfg` needs."""
    h, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes = {
        "token_embd.weight": (cfg.vocab_size, h),
        "output_norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        shapes.update(
            {
                p + "attn_norm.weight": (h,),
                p + "attn_q.weight": (q, h),
                p + "attn_k.weight": (kv, h),
                p + "attn_v.weight": (kv, h),
                p + "attn_output.weight": (h, q),
                p + "ffn_norm.weight": (h,),
            }
        )
        if cfg.is_moe_layer(i):
            e, fe = cfg.num_experts, cfg.moe_intermediate_size
            shapes.update(
                {
                    p + "ffn_gate_inp.weight": (e, h),
                    p + "ffn_gate_exps.weight": (e, fe, h),
                    p + "ffn_up_exps.weight": (e, fe, h),
                    p + "ffn_down_exps.weight": (e, h, fe),
                }
            )
        else:
            shapes.update(
                {
                    p + "ffn_gate.weight": (f, h),
                    p + "ffn_up.weight": (f, h),
                    p + "ffn_down.weight": (h, f),
                }
            )
        if cfg.attention_bias:
            shapes.update({p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)})
        if cfg.qk_norm:
            shapes.update({p + "attn_q_norm.weight": (cfg.head_dim,), p + "attn_k_norm.weight": (cfg.head_dim,)})
    if cfg.rope_scaling and cfg.rope_scaling.get("type") == "freq_factors":
        shapes[ROPE_FREQS] = (cfg.head_dim // 2,)
    return shapes


def check_tensors(tensors: dict, cfg: ModelConfig, where: str) -> dict:
    """Keep the tensors `cfg` needs; raise ModelLoadError for any missing or misshapen one."""
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in tensors]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"{where}: missing tensors {', '.join(missing[:5])}{more}")
    for name, shape in want.items():
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise ModelLoadError(f"{where}: tensor {name} has shape {list(got)}, expected {list(shape)}")
    return {n: tensors[n] for n in want}


# ModelConfig field -> its name in a source's metadata, for error messages.
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "mlp_only_layers", "intermediate_size")


def check_dimensions(cfg: ModelConfig, where: str, names: dict) -> None:
    """Raise ModelLoadError naming the source's field when a size or constant cannot describe a model.

    `names` maps ModelConfig fields to the field's name in the source
    (config.json key or GGUF metadata key); every one of them is checked:
    sizes must be positive (intermediate_size may be 0 in a MoE model),
    rms_norm_eps and rope_theta finite and positive (eps may be 0).
    """
    for field, name in names.items():
        v = getattr(cfg, field)
        if field in ("rms_norm_eps", "rope_theta"):
            eps = field == "rms_norm_eps"
            if not (isinstance(v, float) and math.isfinite(v) and (v >= 0 if eps else v > 0)):
                want = "non-negative" if eps else "positive"
                raise ModelLoadError(f"{where}: field {name} must be a finite {want} number, got {v!r}")
            continue
        low = 0 if field == "intermediate_size" and cfg.num_experts else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            want = "a non-negative" if low == 0 else "a positive"
            raise ModelLoadError(f"{where}: field {name} must be {want} integer, got {v!r}")


def check_moe_config(cfg: ModelConfig, where: str, names: dict) -> None:
    """Raise ModelLoadError naming the source's field when the expert settings are inconsistent.

    `names` maps each of MOE_FIELDS to the field's name in the source
    (config.json key or GGUF metadata key).
    """

    def bad(field: str, why: str):
        return ModelLoadError(f"{where}: field {names[field]} {why}")

    if cfg.num_experts < 1:
        raise bad("num_experts", f"must be at least 1, got {cfg.num_experts}")
    if not 1 <= cfg.num_experts_per_tok <= cfg.num_experts:
        raise bad(
            "num_experts_per_tok",
            f"must be between 1 and the expert count {cfg.num_experts}, got {cfg.num_experts_per_tok}",
        )
    if cfg.moe_intermediate_size < 1:
        raise bad("moe_intermediate_size", f"must be positive, got {cfg.moe_intermediate_size}")
    out_of_range = [i for i in cfg.mlp_only_layers if not 0 <= i < cfg.num_layers]
    if out_of_range:
        raise bad("mlp_only_layers", f"names layer {out_of_range[0]}, outside 0..{cfg.num_layers - 1}")
    if cfg.mlp_only_layers and cfg.intermediate_size < 1:
        raise bad(
            "intermediate_size",
            f"must be positive for the dense layers {list(cfg.mlp_only_layers)}, got {cfg.intermediate_size}",
        )
