"""Tiny random Hugging Face checkpoints for checking the engine against transformers.

Each variant is a real `transformers` model with a few layers and a hidden
size of 64, saved as a safetensors folder (config.json, model.safetensors,
a small word-level tokenizer). Weights are drawn with fixed seeds and at a
scale where attention is sharp and position-dependent, so a wrong rotation,
head grouping or norm weight changes the logits visibly; norm weights and
biases are randomized too, since their default values (ones, zeros) would
hide a missing or misplaced parameter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 320

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)

# name -> (architecture, extra config fields)
VARIANTS = {
    "llama": ("llama", dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "llama_tied": ("llama", dict(rope_theta=500000.0, tie_word_embeddings=True, num_key_value_heads=1)),
    # Band edges at wavelengths 16 and 64 put the 8 frequency pairs of a
    # 16-wide head in all three llama3 regimes (kept, blended, divided).
    "llama3_scaled": (
        "llama",
        dict(
            rope_theta=10000.0,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama_linear": (
        "llama",
        dict(rope_theta=10000.0, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    ),
    "qwen2": ("qwen2", dict(rope_theta=1000000.0, tie_word_embeddings=True, num_hidden_layers=3)),
    "qwen2_untied": ("qwen2", dict(rope_theta=10000.0, tie_word_embeddings=False)),
    # head_dim 24 != hidden / heads = 16, as in real Qwen3 models.
    "qwen3": ("qwen3", dict(rope_theta=1000000.0, tie_word_embeddings=False, head_dim=24, num_hidden_layers=3)),
    "qwen3_tied": (
        "qwen3",
        dict(rope_theta=10000.0, tie_word_embeddings=True, head_dim=32, num_attention_heads=6, num_key_value_heads=2),
    ),
    # 8 experts, 2 per token; layer 1 keeps a dense FFN (mlp_only_layers).
    "qwen3moe": (
        "qwen3moe",
        dict(
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            head_dim=24,
            num_hidden_layers=3,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
    ),
    # Unnormalized top-k weights, tied embeddings; decoder_sparse_step 2 makes layer 0 dense.
    "qwen3moe_unnormed": (
        "qwen3moe",
        dict(
            rope_theta=10000.0,
            tie_word_embeddings=True,
            head_dim=16,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=64,
            norm_topk_prob=False,
            decoder_sparse_step=2,
        ),
    ),
}


def _config(arch: str, fields: dict):
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "qwen3moe": transformers.Qwen3MoeConfig,
    }[arch]
    kw = dict(_COMMON)
    kw.update(fields)
    if arch == "llama":
        kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    return cls(**kw)


def _model_class(arch: str):
    import transformers

    return {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "qwen3moe": transformers.Qwen3MoeForCausalLM,
    }[arch]


@torch.no_grad()
def _randomize(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.3 * noise)
        elif "embed_tokens" in name:
            p.copy_(0.4 * noise)
        else:
            # ~1.2 / sqrt(fan_in): unit-ish activations, attention far from uniform.
            p.copy_(noise * (1.2 / p.shape[-1] ** 0.5))


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 256,
                "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
            }
        )
    )


def make_hf_model(variant: str, folder, seed: int = 0):
    """Build, randomize and save one variant; returns (folder, model in fp32 eval mode)."""
    arch, fields = VARIANTS[variant]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = _config(arch, fields)
    config._attn_implementation = "eager"
    model = _model_class(arch)(config).to(torch.float32).eval()
    _randomize(model, seed + 1000)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder)
    return folder, model


def hf_logits(model, prompt, decode=()) -> torch.Tensor:
    """fp32 logits [len(prompt) + len(decode), vocab] from HF: one prefill, then cached single steps."""
    import transformers

    with torch.no_grad():
        cache = transformers.DynamicCache(config=model.config)
        rows = [model(input_ids=torch.tensor([list(prompt)]), cache=cache, use_cache=True).logits[0]]
        for t in decode:
            rows.append(model(input_ids=torch.tensor([[int(t)]]), cache=cache, use_cache=True).logits[0])
        return torch.cat(rows).float()
