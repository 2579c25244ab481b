"""Batched greedy generation: the same tokens as one prompt at a time and as HF ``generate``."""

import pytest
import torch
from tiny_models import D_MODEL, VOCAB, TokenIdTokenizer

from dpotox.engine.arch import Adapter
from dpotox.engine.generate import (
    PromptError,
    encode_prompts,
    generate,
    generate_many,
    greedy,
    sample,
)
from dpotox.engine.spec import AddResidual, Intervention, ScaleKeys, ScaleNeurons, SetNeurons
from dpotox.sources import assets


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=g).tolist()
    # Token 2 is EOS for the gated tiny models; keep prompts free of specials.
    return [torch.randint(3, VOCAB - 1, (k,), generator=g).tolist() for k in lengths]


def _spec() -> Intervention:
    vec = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(5))
    return Intervention(
        "patch+steer",
        [
            SetNeurons(0, [1, 2, 3, 40], torch.tensor([2.0, -2.0, 0.0, 1.5])),
            AddResidual(1, vec, alpha=-0.5, where="generation"),
        ],
    )


@pytest.mark.parametrize("with_spec", [False, True])
def test_batched_equals_one_at_a_time(model, with_spec):
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    prompts = _prompts(11)
    ids = [f"p{i}" for i in range(len(prompts))]
    spec = _spec() if with_spec else None
    batched = greedy(adapter, tok, prompts, ids, spec=spec, new_tokens=12, batch_size=4)
    single = [
        greedy(adapter, tok, [p], [i], spec=spec, new_tokens=12, batch_size=1).new_tokens[0]
        for p, i in zip(prompts, ids)
    ]
    assert batched.new_tokens == single
    unsorted = greedy(
        adapter, tok, prompts, ids, spec=spec, new_tokens=12, batch_size=3, sort=False
    )
    assert unsorted.new_tokens == single
    assert all(len(t) <= 12 for t in single) and batched.n_new_tokens == sum(map(len, single))
    assert len(batched.texts) == len(prompts)


def test_shared_prefix_equals_each_condition_alone(model):
    """Conditions evaluated together (sharing a prefix prefill where they can) give each
    condition's tokens as evaluating it alone does, in any order, with prefix-editing specs
    (steering at every position, a weight edit) between them."""
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    prompts = _prompts(9, seed=3)
    ids = [f"p{i}" for i in range(len(prompts))]
    g = torch.Generator().manual_seed(7)
    specs = [
        None,
        _spec(),
        Intervention("steer-all", [AddResidual(1, torch.randn(D_MODEL, generator=g), alpha=-2.0)]),
        Intervention(
            "per-prompt",
            [SetNeurons(1, [0, 5, 9], torch.randn(len(ids), 3, generator=g), prompt_ids=ids)],
        ),
        Intervention("keys", [ScaleKeys(0, [1, 2, 3], torch.tensor(8.0))]),
        Intervention("edit", [ScaleNeurons(0, list(range(0, 60, 2)), torch.tensor(0.2))]),
    ]
    assert [s.shares_prefix for s in specs[1:]] == [True, False, True, False, True]
    alone = [
        greedy(adapter, tok, prompts, ids, spec=s, new_tokens=8, batch_size=4).new_tokens
        for s in specs
    ]
    together = generate_many(adapter, tok, prompts, ids, specs, new_tokens=8, batch_size=4)
    assert [g.new_tokens for g in together] == alone
    # Reordered, and two conditions per stacked batch (4 prompts x 2 = 8 rows).
    reordered = generate_many(
        adapter, tok, prompts, ids, specs[::-1], new_tokens=8, batch_size=4, stack_rows=8
    )
    assert [g.new_tokens for g in reordered] == alone[::-1]
    # The conditions differ, so sharing did not hand one condition's tokens to another.
    assert len({str(a) for a in alone}) == len(specs)
    sampled = [
        generate(
            adapter, tok, prompts, ids, spec=s, new_tokens=6, batch_size=4, temperature=1.0, seed=3
        ).new_tokens
        for s in specs[:2]
    ]
    assert [
        g.new_tokens
        for g in generate_many(
            adapter,
            tok,
            prompts,
            ids,
            specs[:2],
            new_tokens=6,
            batch_size=4,
            temperature=1.0,
            seed=3,
        )
    ] == sampled


@pytest.mark.parametrize("block", [1024, 2, 3])
def test_sample_draws_from_the_softmax(block):
    """Inverse-transform sampling, in one block or several (a partial last one too):
    frequencies follow softmax(logits / T), a token of zero probability is never drawn (a
    whole block of them neither), and the same generator seed gives the same tokens."""
    inf = float("inf")
    logits = torch.tensor([[2.0, 1.0, 0.0, -inf, 0.5, -inf, -inf, 1.5, -inf]]).repeat(40_000, 1)
    drawn = sample(logits, 2.0, torch.Generator().manual_seed(0), block=block)
    freq = torch.bincount(drawn, minlength=9).double() / len(drawn)
    want = torch.softmax(logits[0].double() / 2.0, dim=-1)
    assert freq[[3, 5, 6, 8]].sum() == 0
    # Binomial standard error at 40,000 draws is below 0.0025; 4 of them.
    assert torch.allclose(freq, want, atol=0.01)
    again = sample(logits[:50], 2.0, torch.Generator().manual_seed(0), block=block)
    assert torch.equal(again, drawn[:50])


def test_samples_share_the_prompt_prefill(model):
    """n samples of each prompt from one prefill give the tokens that the prompts repeated
    n times (one block of rows per sample) give with the same seed, rows in prompt order,
    under a per-prompt edit too; and the samples of one prompt differ."""
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    prompts = _prompts(5, seed=4)
    ids = [f"p{i}" for i in range(len(prompts))]
    n = 3
    spec = Intervention(
        "per-prompt",
        [
            SetNeurons(
                1,
                [0, 5, 9],
                torch.randn(len(ids), 3, generator=torch.Generator().manual_seed(1)),
                prompt_ids=ids,
                where="generation",
            )
        ],
    )
    for s in (None, spec):
        kw = dict(spec=s, new_tokens=7, temperature=1.0, seed=11, sort=False)
        shared = generate(adapter, tok, prompts, ids, n_samples=n, batch_size=n * 5, **kw)
        repeated = generate(adapter, tok, prompts * n, ids * n, batch_size=n * 5, **kw)
        assert shared.ids == [i for i in ids for _ in range(n)]
        assert shared.new_tokens == [
            repeated.new_tokens[k * len(ids) + i] for i in range(len(ids)) for k in range(n)
        ]
    assert len({str(t) for t in shared.new_tokens[:n]}) > 1
    with pytest.raises(ValueError, match="greedy samples"):
        generate(adapter, tok, prompts, ids, n_samples=2)


def test_the_spec_changes_the_continuations(model):
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    prompts = _prompts(6, seed=1)
    ids = [str(i) for i in range(6)]
    base = greedy(adapter, tok, prompts, ids, new_tokens=10)
    steered = greedy(
        adapter,
        tok,
        prompts,
        ids,
        new_tokens=10,
        spec=Intervention(
            "s",
            [
                AddResidual(
                    0, torch.randn(D_MODEL, generator=torch.Generator().manual_seed(0)), alpha=10.0
                )
            ],
        ),
    )
    assert base.new_tokens != steered.new_tokens


def test_equals_hf_generate_with_a_reference_hook(model):
    """The reference code: HF generate, a hook that patches the last position of every call."""
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    prompts = _prompts(8, seed=2)
    neurons, values = torch.tensor([1, 2, 3, 40]), torch.tensor([2.0, -2.0, 0.0, 1.5])

    def hook(mod, args):
        m = args[0].clone()
        m[:, -1, neurons] = values
        return (m,)

    handle = adapter.out_proj(0).register_forward_pre_hook(hook)
    try:
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=10,
            min_new_tokens=10,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    finally:
        handle.remove()
    ours = greedy(
        adapter,
        tok,
        prompts,
        [str(i) for i in range(8)],
        new_tokens=10,
        batch_size=8,
        sort=False,
        spec=Intervention("p", [SetNeurons(0, neurons, values)]),
    )
    # min_new_tokens keeps HF from stopping at EOS; compare up to our EOS cut.
    assert ours.new_tokens == [
        row[: len(t)] for row, t in zip(out[:, width:].tolist(), ours.new_tokens)
    ]
    assert all(len(t) == 10 or t[-1] == tok.eos_token_id for t in ours.new_tokens)


def test_rows_stop_at_eos_and_pad(model):
    """Make a token the base run emits mid-way the EOS: rows end there, the rest go on."""
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    prompts, ids = _prompts(6, seed=4), list("abcdef")
    base = greedy(adapter, tok, prompts, ids, new_tokens=10)
    eos = base.new_tokens[0][3]
    model.generation_config.eos_token_id = eos
    tok.eos_token_id = tok.pad_token_id = eos
    gen = greedy(adapter, tok, prompts, ids, new_tokens=10, batch_size=4)
    for before, after in zip(base.new_tokens, gen.new_tokens):
        cut = before.index(eos) + 1 if eos in before else len(before)
        assert after == before[:cut]
    assert len(gen.new_tokens[0]) <= 4
    single = [
        greedy(adapter, tok, [p], [i], new_tokens=10).new_tokens[0] for p, i in zip(prompts, ids)
    ]
    assert gen.new_tokens == single


@pytest.fixture(scope="module")
def gpt2_tok():
    return assets.gpt2_tokenizer()


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "prompt 'q1' is empty"),
        ("   \n", "prompt 'q1' is empty"),
        ("bad \udcff byte", "prompt 'q1' is not valid UTF-8"),
        ("<|endoftext|>", "tokenises to nothing but special tokens"),
    ],
)
def test_bad_prompts_name_the_prompt(gpt2_tok, text, message):
    with pytest.raises(PromptError, match=message):
        encode_prompts(gpt2_tok, ["fine prompt", text], ["q0", "q1"], max_tokens=8)


def test_prompts_are_cut_to_their_first_tokens(gpt2_tok):
    text = "one two three four five six seven eight nine ten"
    (tokens,) = encode_prompts(gpt2_tok, [text], ["x"], max_tokens=4)
    assert tokens == gpt2_tok(text)["input_ids"][:4]
