"""Tiny random configs of the decoder architectures the parity set covers (fp32, two layers).

Each entry builds a transformers config small enough that building, saving, loading and generating
a few tokens takes well under a second. Where an architecture has an attention feature (sliding
windows, logit soft-capping, attention sinks, attention multipliers), the config makes it bite on
short prompts: a window shorter than the prompts, a soft cap below the typical score size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

VOCAB = 256
WINDOW = 6  # shorter than most parity prompts, so windowed layers differ from full attention

_COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               eos_token_id=None, bos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
_MHA = {**_COMMON, "num_key_value_heads": 4}
_ALTERNATING = ["sliding_attention", "full_attention"]


def _config(class_name: str, **fields: Any) -> Callable[[], Any]:
    def build() -> Any:
        import transformers

        return getattr(transformers, class_name)(**fields)

    return build


def _gpt2() -> Any:
    import transformers

    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=0)


def _gptj() -> Any:
    import transformers

    return transformers.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=0, tie_word_embeddings=False)


CONFIGS: dict[str, Callable[[], Any]] = {
    "llama": _config("LlamaConfig", **_COMMON),
    "mistral": _config("MistralConfig", **_COMMON, head_dim=16, sliding_window=WINDOW),
    "qwen2": _config("Qwen2Config", **_COMMON),
    "qwen3": _config("Qwen3Config", **_COMMON, head_dim=16),
    "gemma": _config("GemmaConfig", **_COMMON, head_dim=16),
    "gemma2": _config("Gemma2Config", **_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                      layer_types=_ALTERNATING, attn_logit_softcapping=1.5, final_logit_softcapping=30.0),
    "gemma3_text": _config("Gemma3TextConfig", **_COMMON, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=WINDOW, layer_types=_ALTERNATING),
    "phi3": _config("Phi3Config", **_COMMON),
    "mixtral": _config("MixtralConfig", **_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _config("Qwen2MoeConfig", **_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64),
    "qwen3_moe": _config("Qwen3MoeConfig", **_COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=32),
    "olmo": _config("OlmoConfig", **_COMMON),
    "olmo2": _config("Olmo2Config", **_COMMON),
    "gpt_neox": _config("GPTNeoXConfig", **_MHA, rotary_pct=0.5),
    "cohere": _config("CohereConfig", **_COMMON),
    "granite": _config("GraniteConfig", **_COMMON, attention_multiplier=0.05, embedding_multiplier=2.0,
                       residual_multiplier=0.5, logits_scaling=2.0),
    "starcoder2": _config("Starcoder2Config", **_COMMON, sliding_window=WINDOW),
    "gpt_oss": _config("GptOssConfig", **_COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                       sliding_window=WINDOW, layer_types=_ALTERNATING,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 8}),
    "phi": _config("PhiConfig", **_MHA, partial_rotary_factor=0.5),
    "gpt2": _gpt2,
    "gptj": _gptj,
    "falcon": _config("FalconConfig", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      eos_token_id=None, bos_token_id=None, pad_token_id=0),
    "stablelm": _config("StableLmConfig", **_COMMON),
    "bert": _config("BertConfig", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=256, pad_token_id=0),
    "deepseek_v2": _config("DeepseekV2Config", **_MHA, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
                           qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1),
}


def save_model(arch: str, directory: Path, seed: int = 0) -> Path:
    """Random weights large enough that greedy choices are not near-ties; attention sinks get values of
    the size of typical scores so they change the output."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:
                param.normal_(0.0, 0.15)
            elif name.endswith("sinks"):
                param.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    return directory


def engine_unless_class_refused(config: Any) -> Any:
    """An `LLMEngine`, or a skip where the installed transformers marks the model class as not using
    the attention interface (that flag changes between transformers versions: GPT-J has it in 5.17)."""
    import pytest

    from sagellm_core.engine import LLMEngine
    from sagellm_core.models.support import UnsupportedModelError

    try:
        return LLMEngine(config)
    except UnsupportedModelError as exc:
        if "_supports_attention_backend = False" in str(exc):
            pytest.skip(f"refused by this transformers version: {exc}")
        raise
