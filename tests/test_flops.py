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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_work_meter_counts_body_head_and_training(family):
    import torch

    from dpotox.engine.flops import WorkMeter

    model = tiny_model(family)
    body, head = decoder_weights(Adapter(model)), VOCAB * D_MODEL
    meter = WorkMeter()
    meter.attach(model)
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        model(input_ids=ids)  # every position's logits
    assert (meter.tokens, meter.trained_tokens) == (10, 0)
    assert meter.flops == pytest.approx(2 * body * 10 + 2 * head * 10)
    meter.reset()
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)  # as a prefill: one logit per row
        model.base_model(input_ids=ids)  # the decoder stack alone, as the probe's features
    assert meter.tokens == 20 and meter.flops == pytest.approx(2 * body * 20 + 2 * head * 2)
    meter.reset()
    model.train()
    model(input_ids=ids).logits.sum().backward()  # forward and backward: three forwards' worth
    assert (meter.tokens, meter.trained_tokens) == (10, 10)
    assert meter.flops == pytest.approx(3 * (2 * body * 10 + 2 * head * 10))
