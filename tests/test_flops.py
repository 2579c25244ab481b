"""FLOP counting for the throughput benchmarks."""

import pytest
from tiny_models import D_MLP, D_MODEL, N_LAYERS, VOCAB, tiny_model

from dpotox.engine.arch import Adapter
from dpotox.engine.flops import decoder_weights, forward_flops, generation_contexts


def test_decoder_weights_count_the_matrices():
    # tiny llama: q, o 32x32; k, v 16x32 (2 of 4 heads for keys/values); gate, up, down 32x64
    attn = 2 * D_MODEL * D_MODEL + 2 * (D_MODEL // 2) * D_MODEL
    assert decoder_weights(Adapter(tiny_model("llama"))) == N_LAYERS * (attn + 3 * D_MODEL * D_MLP)
    # tiny gpt2: c_attn 32x96, c_proj 32x32, c_fc 32x64, mlp c_proj 64x32
    assert decoder_weights(Adapter(tiny_model("gpt2"))) == N_LAYERS * (
        4 * D_MODEL**2 + 2 * D_MODEL * D_MLP
    )


def test_forward_flops_adds_attention_and_unembedding():
    a = Adapter(tiny_model("llama"))
    w = decoder_weights(a)
    assert generation_contexts([3], [2]) == [1, 2, 3, 4]
    assert forward_flops(a, [1, 2, 3, 4], logit_tokens=2) == pytest.approx(
        2 * w * 4 + 4 * N_LAYERS * D_MODEL * 10 + 2 * VOCAB * D_MODEL * 2
    )
