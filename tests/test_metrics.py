"""Metrics: bootstrap CI, bag-of-words F1, and log-perplexity under an intervention."""

import math

import numpy as np
import pytest
import torch
from tiny_models import ALL_FAMILIES, VOCAB, tiny_model

from dpotox.engine.arch import Adapter
from dpotox.engine.metrics import (
    bootstrap_ci,
    f1,
    f1_items,
    log_perplexities,
    log_perplexity,
    repetition,
    text_quality,
    windows,
    words,
)
from dpotox.engine.spec import Intervention, SetNeurons, ablate
from dpotox.sources import assets


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    x = np.random.default_rng(0).random(200)
    a, b = bootstrap_ci(x, samples=500, seed=3), bootstrap_ci(x, samples=500, seed=3)
    assert a == b
    assert a.low < a.mean < a.high and a.mean == pytest.approx(x.mean())
    # roughly mean +- 1.96 standard errors
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert a.high - a.low == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert bootstrap_ci(x, samples=500, seed=4) != a
    narrow = bootstrap_ci(x, samples=500, level=0.5, seed=3)
    assert a.low < narrow.low < narrow.high < a.high
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_f1_on_words():
    assert words("The Cat, sat on a mat!") == ["cat", "sat", "on", "mat"]
    assert f1("the cat sat", "a cat sat down") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert f1("x y", "z") == 0.0
    assert f1("", "") == 1.0 and f1("", "word") == 0.0
    assert f1("a a b", "a b b") == pytest.approx(2 / 3)  # bags count repeats


def test_windows_and_f1_items_split_token_streams():
    tok = assets.gpt2_tokenizer()
    text = " ".join(f"w{i}" for i in range(60))
    n = len(tok(text)["input_ids"])
    ids, wins = windows(tok, [text, "hello there", "hi"], ["a", "b", "c"], 16)
    assert [len(w) for w in wins[:-1]] == [16] * (n // 16) + ([n % 16] if n % 16 > 1 else [])
    assert sum(map(len, wins[:-1])) == n - (n % 16 if n % 16 == 1 else 0)
    assert (
        ids[-1] == "b" and wins[-1] == tok("hello there")["input_ids"]
    )  # "hi": one token, dropped
    items = f1_items(tok, ["too short", text, text], prompt_tokens=8, new_tokens=5, limit=1)
    assert len(items) == 1 and items[0][0] == 1 and len(items[0][1]) == 8
    assert items[0][2] == tok.decode(tok(text)["input_ids"][8:13])


def _windows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in (12, 5, 9, 2, 12)]


def test_log_perplexity_matches_the_model_loss(model):
    adapter = Adapter(model)
    wins = _windows()
    ids = [str(i) for i in range(len(wins))]
    got = log_perplexity(adapter, wins, ids, batch_size=3)
    nll = []
    with torch.no_grad():
        for w in wins:
            out = model(torch.tensor([w]), labels=torch.tensor([w]))
            nll.append(out.loss.item() * (len(w) - 1))
    assert got.n_tokens == sum(len(w) - 1 for w in wins)
    assert got.log_ppl == pytest.approx(sum(nll) / got.n_tokens, rel=1e-5)
    assert log_perplexity(adapter, wins, ids, batch_size=1).log_ppl == pytest.approx(
        got.log_ppl, rel=1e-5
    )


def test_perplexity_under_an_intervention_and_the_first_position_quirk(model):
    adapter = Adapter(model)
    wins, ids = _windows(1), [str(i) for i in range(5)]
    spec = Intervention("abl", [ablate(layer, range(32), where="generation") for layer in range(2)])
    base = log_perplexity(adapter, wins, ids).log_ppl
    everywhere = log_perplexity(adapter, wins, ids, spec=spec).log_ppl
    first = log_perplexity(adapter, wins, ids, spec=spec, positions="first").log_ppl
    assert everywhere != pytest.approx(base, rel=1e-4)
    assert first != pytest.approx(everywhere, rel=1e-4)
    # The quirk patches position 0 only: a window's first prediction uses just that position.
    only_two = [w[:2] for w in wins]
    assert log_perplexity(
        adapter, only_two, ids, spec=spec, positions="first"
    ).log_ppl == pytest.approx(log_perplexity(adapter, only_two, ids, spec=spec).log_ppl, rel=1e-6)


def _direct(model, adapter, wins, k: int, neurons: list[int], edit_from: int | None) -> float:
    """The generation-like log-perplexity computed without the engine: one window at a time,
    layer 0's ``neurons`` zeroed from position ``edit_from`` on (None: no edit), the
    predictions of tokens after the first ``k`` scored."""

    def hook(mod, args):
        m = args[0].clone()
        m[:, edit_from:, neurons] = 0.0
        return (m, *args[1:])

    h = adapter.out_proj(0).register_forward_pre_hook(hook) if edit_from is not None else None
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for w in wins:
                if len(w) <= k:
                    continue
                logits = model(torch.tensor([w])).logits[0, :-1]
                nll = torch.nn.functional.cross_entropy(
                    logits, torch.tensor(w[1:]), reduction="none"
                )
                total += float(nll[k - 1 :].sum())
                count += len(w) - k
    finally:
        if h is not None:
            h.remove()
    return total / count


def test_generation_like_perplexity_edits_and_scores_after_the_context(model):
    """positions="generation": the first k tokens are an unedited context; activation edits act
    from its last token on and only the tokens after it are scored; edits that act everywhere
    (steering, value-vector ablation) act everywhere. Checked against a direct computation."""
    adapter = Adapter(model)
    wins, ids = _windows(1), [str(i) for i in range(5)]
    k, neurons = 4, list(range(16))
    spec = Intervention("abl", [ablate(0, neurons, where="generation")])

    got = log_perplexity(adapter, wins, ids, spec=spec, positions="generation", context=k)
    assert got.log_ppl == pytest.approx(_direct(model, adapter, wins, k, neurons, k - 1), rel=1e-5)
    assert got.n_tokens == sum(len(w) - k for w in wins if len(w) > k)
    plain = log_perplexity(adapter, wins, ids, positions="generation", context=k).log_ppl
    assert plain == pytest.approx(_direct(model, adapter, wins, k, neurons, None), rel=1e-5)
    assert plain != pytest.approx(got.log_ppl)
    # Ablating the value vectors acts on the context too, as in generation.
    everywhere = Intervention("abl", [ablate(0, neurons, where="all")])
    got_all = log_perplexity(adapter, wins, ids, spec=everywhere, positions="generation", context=k)
    assert got_all.log_ppl == pytest.approx(_direct(model, adapter, wins, k, neurons, 0), rel=1e-5)
    first = log_perplexity(adapter, wins, ids, spec=everywhere, positions="first").log_ppl
    assert first == pytest.approx(log_perplexity(adapter, wins, ids, spec=everywhere).log_ppl)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_perplexities_share_the_unedited_context(family):
    """Several specs in one call: those that leave the context unedited run only the tokens
    after it on its shared keys and values, the others whole windows; each gets the numbers
    of the direct computation, on every family (sliding-window caches included)."""
    model = tiny_model(family)
    adapter = Adapter(model)
    wins = _windows(2) + _windows(3)
    ids = [str(i) for i in range(len(wins))]
    k, neurons = 5, list(range(16))
    specs = [
        None,
        Intervention("gen", [ablate(0, neurons, where="generation")]),
        Intervention("all", [ablate(0, neurons, where="all")]),
    ]
    got = log_perplexities(
        adapter, wins, ids, specs, positions="generation", context=k, batch_size=4
    )
    for p, edit_from in zip(got, (None, k - 1, 0), strict=True):
        assert p.log_ppl == pytest.approx(
            _direct(model, adapter, wins, k, neurons, edit_from), rel=1e-5
        )
        assert p.n_tokens == sum(len(w) - k for w in wins if len(w) > k)
    # A per-prompt edit: each window gets its own text's values, shared context or not.
    values = torch.randn(len(wins), len(neurons), generator=torch.Generator().manual_seed(0))
    per_prompt = Intervention("pp", [SetNeurons(0, neurons, values, prompt_ids=ids)])
    alone = [
        log_perplexity(adapter, [w], [i], spec=per_prompt, positions="generation", context=k)
        for w, i in zip(wins, ids, strict=True)
        if len(w) > k
    ]
    together = log_perplexities(
        adapter, wins, ids, [None, per_prompt], positions="generation", context=k, batch_size=4
    )[1]
    expected = sum(a.log_ppl * a.n_tokens for a in alone) / sum(a.n_tokens for a in alone)
    assert together.log_ppl == pytest.approx(expected, rel=1e-5)


def test_text_quality_of_hand_made_continuations():
    texts = ["The cat, the cat; THE CAT", "", "a b c d"]
    q = text_quality(texts)
    # Words: the cat the cat the cat | - | a b c d: 10 words, 6 distinct; 8 bigrams, 5 distinct.
    assert q["distinct_1"] == pytest.approx(0.6) and q["distinct_2"] == pytest.approx(5 / 8)
    # Bigram repetition per text (as the reference): 1 - 2/5, 0 (no bigram), 1 - 3/3.
    assert repetition(texts[0]) == pytest.approx(0.6) and repetition("one") == 0.0
    assert q["repetition"] == pytest.approx(0.6 / 3)
    assert q["empty_share"] == pytest.approx(1 / 3)
    assert text_quality(["!!", " "])["empty_share"] == 1.0
    assert math.isnan(text_quality(["", ""])["distinct_1"])
