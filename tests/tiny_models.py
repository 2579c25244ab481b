"""Tiny random-weight models of every supported family, built from configs (no download)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    OlmoConfig,
    Phi3Config,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 256
D_MODEL = 32
D_MLP = 64
N_LAYERS = 2

_GATED = dict(
    num_hidden_layers=N_LAYERS,
    hidden_size=D_MODEL,
    intermediate_size=D_MLP,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CONFIGS = {
    # GPT-2 at its default init (0.02) is dominated by its biases and repeats one token.
    "gpt2": lambda vocab: GPT2Config(
        n_layer=N_LAYERS,
        n_embd=D_MODEL,
        n_inner=D_MLP,
        n_head=4,
        initializer_range=0.3,
        n_positions=128,
        vocab_size=vocab,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    ),
    "llama": lambda vocab: LlamaConfig(**{**_GATED, "vocab_size": vocab}),
    "mistral": lambda vocab: MistralConfig(**{**_GATED, "vocab_size": vocab}),
    "gemma2": lambda vocab: Gemma2Config(**{**_GATED, "vocab_size": vocab, "head_dim": 8}),
    "gemma3": lambda vocab: Gemma3TextConfig(**{**_GATED, "vocab_size": vocab, "head_dim": 8}),
}
# The families every stage's tests run on (the papers' four and the embedded models').
FAMILIES = tuple(CONFIGS)
# Families a researcher may bring: the adapter's checks, the hook engine and generation run on
# them too (tests/test_arch.py, tests/test_families.py), the slower stage tests on FAMILIES.
CONFIGS.update(
    {
        "gemma": lambda vocab: GemmaConfig(**{**_GATED, "vocab_size": vocab, "head_dim": 8}),
        "qwen2": lambda vocab: Qwen2Config(**{**_GATED, "vocab_size": vocab}),
        "qwen3": lambda vocab: Qwen3Config(**{**_GATED, "vocab_size": vocab, "head_dim": 8}),
        "olmo": lambda vocab: OlmoConfig(**{**_GATED, "vocab_size": vocab}),
        "olmo2": lambda vocab: Olmo2Config(**{**_GATED, "vocab_size": vocab}),
        "gpt_neox": lambda vocab: GPTNeoXConfig(
            num_hidden_layers=N_LAYERS,
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_attention_heads=4,
            vocab_size=vocab,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            initializer_range=0.3,
        ),
        "phi3": lambda vocab: Phi3Config(**{**_GATED, "vocab_size": vocab, "pad_token_id": 0}),
    }
)
ALL_FAMILIES = tuple(CONFIGS)
NEW_FAMILIES = tuple(f for f in ALL_FAMILIES if f not in FAMILIES)


def tiny_model(family: str, *, vocab: int = VOCAB, seed: int = 0) -> PreTrainedModel:
    """A float32 random-weight causal LM of ``family`` in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](vocab), dtype=torch.float32)
    # Random init leaves GPT-2's biases at zero; make them non-zero so the bias term of the
    # value-vector identity is really exercised.
    # The post-MLP norms start at gain 1; perturb them so that folding the gain into the value
    # vectors (Gemma-2/3, OLMo-2) is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "post_feedforward_layernorm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def tiny_multimodal_gemma3(*, vocab: int = VOCAB, seed: int = 0) -> PreTrainedModel:
    """A float32 random-weight Gemma-3 checkpoint with its vision tower (model_type gemma3,
    ``Gemma3ForConditionalGeneration``), as Gemma-3 4B and up are published."""
    torch.manual_seed(seed)
    text = CONFIGS["gemma3"](vocab).to_dict()
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=vocab - 1,
        boi_token_index=vocab - 3,
        eoi_token_index=vocab - 2,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def dpo_like(model: PreTrainedModel, seed: int = 1) -> PreTrainedModel:
    """A copy with every weight nudged by 5%: a stand-in for a DPO model of the same base."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    return other


class TokenIdTokenizer:
    """The little of a tokenizer that generation needs, for models with no real vocabulary:
    pad/EOS ids, and decoding that spells token ids out."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.eos_token_id = model.config.eos_token_id
        self.pad_token_id = self.eos_token_id

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [
            " ".join(str(t) for t in r if not (skip_special_tokens and t == self.eos_token_id))
            for r in rows
        ]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.batch_decode([ids], skip_special_tokens)[0]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """Text of spelled-out ids (as ``decode`` writes it) back to the ids."""
        return {"input_ids": [int(t) for t in text.split()]}


def prepared_gpt2(root: Path, name: str = "tiny") -> Path:
    """A tiny random GPT-2 with the real GPT-2 tokenizer, prepared as the workflow prepares a
    model (``root/model``): stages that tokenise text can run on it offline."""
    from dpotox.sources import assets, prepare_model

    tiny_model("gpt2", vocab=50257).save_pretrained(root / "src")
    assets.gpt2_tokenizer().save_pretrained(root / "src")
    return prepare_model(
        name,
        {
            "source": {"kind": "local", "path": str(root / "src")},
            "family": "gpt2",
            "dtype": "float32",
        },
        root / "model",
    )
