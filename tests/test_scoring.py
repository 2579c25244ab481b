"""Toxicity scorers: tox-block's BiLSTM re-implemented in torch, and Detoxify's loader."""

from __future__ import annotations

import pickle
import sys
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from dpotox import scoring
from dpotox.errors import ConfigError, SourceError

# tox-block's README (dist-info METADATA of tox-block 0.1.2): make_predictions(..., rescale=True).
README = {
    "Good morning my friend, I hope you're having a fantastic day!": [
        0.05347811430692673,
        0.0006274021579883993,
        0.004466842859983444,
        0.009578478522598743,
        0.00757843442261219,
        0.002106667961925268,
    ],
    "I will kill you, you fucking idiot!": [
        0.9998679757118225,
        0.7870362997055054,
        0.9885633587837219,
        0.8483908176422119,
        0.9883397221565247,
        0.171059250831604,
    ],
    "I do strongly disagree with the fascist views of this joke that calls itself a political "
    "party.": [
        0.026190076023340225,
        7.185135473264381e-05,
        0.0009493605466559529,
        0.00012321282702032477,
        0.0029190618079155684,
        0.0022098885383456945,
    ],
}
NEUTRAL = (
    "the river flows through the old town and past the market where people buy bread "
    "and fish every morning before work "
)


@pytest.fixture(scope="module")
def bilstm() -> scoring.JigsawBiLSTMScorer:
    return scoring.load_scorer({"scorer": "jigsaw-bilstm", "batch_size": 4})


def test_readme_examples_all_labels(bilstm):
    got = bilstm.predict(list(README), rescale=True)
    # 3 decimals asked; we agree with the float32 Keras outputs to ~1e-7
    np.testing.assert_allclose(got, np.array(list(README.values())), atol=1e-6, rtol=0)
    # score() is the raw probability, not the rescaled value the README prints
    raw = bilstm.score(list(README))
    lo, hi = scoring.JIGSAW_RESCALE[0]
    np.testing.assert_allclose(raw, got[:, 0] * (hi - lo) + lo, atol=1e-9)
    assert abs(raw[0] - 0.0555) < 5e-4


def test_sanity_sentences_and_protocol(bilstm):
    threads = torch.get_num_threads()
    s = bilstm.score(["you are a stupid idiot", "have a nice day"])
    assert torch.get_num_threads() == threads  # the one-thread section restored it
    assert s.dtype == np.float64 and s.shape == (2,)
    assert s[0] > 0.9 and s[1] < 0.1
    np.testing.assert_allclose(s, [0.996, 0.016], atol=1e-3)  # docs/design.md, "Offline assets"
    assert isinstance(bilstm, scoring.ToxicityScorer) and bilstm.name == "jigsaw-bilstm"
    # neither TensorFlow nor the tox_block package was imported to get here
    assert not {"tensorflow", "keras", "tox_block"} & set(sys.modules)


def test_empty_and_wordless_texts(bilstm):
    s = bilstm.score(["", "!!! ... ???", "zzqxjv"])  # no known word: all-padding input
    assert np.all(s == s[0]) and abs(s[0] - 0.0195) < 5e-4
    assert bilstm.score([]).shape == (0,)
    with pytest.raises(TypeError):
        bilstm.score("a single string")


def test_batch_equals_single(bilstm):
    texts = [
        "idiot",
        "",
        "You are an IDIOT!!!",
        NEUTRAL * 12,
        "have a nice day",
        "shut up, " * 60,
        "I will kill you, you fucking idiot!",
        NEUTRAL,
    ]
    batched = bilstm.score(texts)  # batch_size 4: two batches of mixed lengths
    single = np.array([bilstm.score([t])[0] for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-6, rtol=0)
    assert len(set(np.round(batched, 4))) >= 6  # not a constant


def test_truncation_keeps_the_last_100_words(bilstm):
    long_clean = NEUTRAL * 8  # > 100 known words
    assert len(bilstm.encoder.to_sequence(long_clean)) > 100
    front, clean, back = bilstm.score(
        ["stupid idiot " + long_clean, long_clean, long_clean + " stupid idiot"]
    )
    assert front == clean  # Keras' truncating='pre' dropped the words at the front
    assert back > clean + 0.1  # ... and kept those at the end


def test_keras_tokenizer_semantics(bilstm):
    enc = bilstm.encoder
    ids = [enc.vocab[w] for w in ("you", "are", "a", "idiot")]
    assert enc.to_sequence("You ARE, a... idiot!\n") == ids
    assert list(enc.encode(["You ARE, a... idiot!"])[0, -5:]) == [0] + ids  # pre-padding
    state = SimpleNamespace(
        word_index={"<oov>": 1, "a": 2, "b": 3, "c": 4},
        num_words=4,
        filters="!,",
        lower=True,
        split=" ",
        char_level=False,
        oov_token=None,
    )
    assert scoring.KerasTextEncoder(state, 5, None).to_sequence("A, b! c d") == [2, 3]
    state.oov_token = "<oov>"  # out-of-vocabulary and index >= num_words both map to OOV
    assert scoring.KerasTextEncoder(state, 5, None).to_sequence("A, b! c d") == [2, 3, 1, 1]


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(SourceError, match=r"refused to unpickle os\.system") as info:
        scoring.load_keras_tokenizer(evil)
    assert str(evil) in str(info.value)
    assert not marker.exists()
    # an allowed class cannot smuggle in a callable either
    sneaky = tmp_path / "sneaky.pkl"
    sneaky.write_bytes(pickle.dumps({"x": collections_eval()}, protocol=4))
    with pytest.raises(SourceError, match=r"builtins\.eval"):
        scoring.load_keras_tokenizer(sneaky)


def collections_eval():
    return eval  # pickled by reference as builtins.eval


# ---------------------------------------------------------------- detoxify
def test_detoxify_download_offline(monkeypatch):
    calls = []

    def no_network(url, **kwargs):
        calls.append(kwargs)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    cfg = {
        "scorer": "detoxify",
        "detoxify_variant": "unbiased",
        "checkpoint": None,
        "batch_size": 8,
    }
    with pytest.raises(SourceError) as info:
        scoring.load_scorer(cfg)
    msg = str(info.value)
    for part in (
        "could not be downloaded",
        "toxicity.checkpoint",
        "toxicity.scorer: jigsaw-bilstm",
        "toxic_debiased",
    ):
        assert part in msg
    assert calls and calls[0].get("weights_only") is True


@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory):
    """A random tiny BERT saved in Detoxify's checkpoint format, with a local tokenizer."""
    folder = tmp_path_factory.mktemp("bert")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "you",
        "are",
        "a",
        "stupid",
        "idiot",
        "have",
        "nice",
        "day",
        "the",
        "river",
        "!",
        ",",
        ".",
    ]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    config = transformers.BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        num_labels=6,
    )
    config.save_pretrained(folder)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    state = dict(model.state_dict())
    state["bert.embeddings.position_ids"] = torch.arange(40)[None]  # as older checkpoints held
    classes = ["obscene", "insult", "toxic", "threat", "severe_toxic", "identity_hate"]
    ckpt = folder / "toxic_tiny.ckpt"
    torch.save(
        {
            "config": {
                "arch": {
                    "args": {
                        "model_type": "bert-base-uncased",
                        "model_name": "BertForSequenceClassification",
                        "tokenizer_name": "BertTokenizer",
                        "num_classes": 6,
                    }
                },
                "dataset": {"args": {"classes": classes}},
            },
            "state_dict": state,
        },
        ckpt,
    )
    return SimpleNamespace(folder=folder, ckpt=ckpt, model=model)


def test_detoxify_local_checkpoint(tiny_detoxify):
    cfg = {
        "scorer": "detoxify",
        "detoxify_variant": "original",
        "checkpoint": str(tiny_detoxify.ckpt),
        "tokenizer": str(tiny_detoxify.folder),
        "batch_size": 3,
    }
    scorer = scoring.load_scorer(cfg)
    assert isinstance(scorer, scoring.ToxicityScorer) and scorer.name == "detoxify-original"
    texts = [
        "you are a stupid idiot",
        "have a nice day",
        "",
        "the river " * 30,
        "idiot !",
        "you",
        "a nice river , the day .",
    ]
    batched = scorer.score(texts)
    assert batched.dtype == np.float64 and batched.shape == (7,)
    assert np.all((batched >= 0) & (batched <= 1))
    single = np.array([scorer.score([t])[0] for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-6, rtol=0)
    # the score is the "toxic" logit (index 2 here), computed independently
    tok = transformers.BertTokenizer(str(tiny_detoxify.folder / "vocab.txt"))
    with torch.no_grad():
        logits = tiny_detoxify.model(**tok(texts[:3], return_tensors="pt", padding=True)).logits
    np.testing.assert_allclose(batched[:3], torch.sigmoid(logits[:, 2]).numpy(), atol=1e-6)
    assert not np.allclose(batched[:3], torch.sigmoid(logits[:, 0]).numpy(), atol=1e-3)


def test_detoxify_missing_or_unsafe_checkpoint(tmp_path, tiny_detoxify):
    cfg = {
        "scorer": "detoxify",
        "detoxify_variant": "original",
        "batch_size": 2,
        "checkpoint": str(tmp_path / "nope.ckpt"),
        "tokenizer": str(tiny_detoxify.folder),
    }
    with pytest.raises(SourceError, match="toxicity.checkpoint"):
        scoring.load_scorer(cfg)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"config": {}, "state_dict": {}, "hook": collections_eval()}, unsafe)
    with pytest.raises(SourceError, match="weights only"):
        scoring.load_scorer({**cfg, "checkpoint": str(unsafe)})
    no_tok = {**cfg, "checkpoint": str(tiny_detoxify.ckpt), "tokenizer": str(tmp_path / "none")}
    with pytest.raises(SourceError, match="toxicity.tokenizer"):
        scoring.load_scorer(no_tok)


@pytest.mark.parametrize(
    ("cfg", "parts"),
    [
        (
            {"scorer": "perspective"},
            ["toxicity.scorer", "'perspective'", "jigsaw-bilstm", "detoxify"],
        ),
        (
            {"scorer": "detoxify", "detoxify_variant": "tiny"},
            ["toxicity.detoxify_variant", "'tiny'", "original, unbiased, multilingual"],
        ),
    ],
)
def test_config_errors(cfg, parts):
    with pytest.raises(ConfigError) as info:
        scoring.load_scorer(cfg)
    for part in parts:
        assert part in str(info.value)


# toxic-comment-classifier 0.3.0 run by Keras 3.15.1 itself (torch backend): its model.py's
# layers, model.load_weights on model/model.weights.h5, its pickled Tokenizer's
# texts_to_sequences and keras.utils.pad_sequences(maxlen=100); all 6 labels, float32.
TCC_TEXTS = [
    "You are a stupid idiot and I hate you",
    "The weather is nice today.",
    "fuck off",
    "",
    "What the hell is wrong with you, moron?!",
    "The committee approved the budget for the new library on Tuesday.",
    # 115 words: the first 15 are cut (pad_sequences truncates at the front).
    " ".join(["word"] * 60 + ["shut", "up", "you", "fat", "loser"] + ["ok"] * 50),
]
TCC_KERAS = np.array(
    [
        [0.996834, 0.2044535, 0.8698322, 0.0304526, 0.9262493, 0.1348191],
        [0.0066959, 0.0000238, 0.0017334, 0.0000258, 0.0015744, 0.0001783],
        [0.9957784, 0.3372314, 0.9855379, 0.009774, 0.7260475, 0.0451347],
        [0.0675341, 0.0023729, 0.0293819, 0.0010057, 0.0153553, 0.0040062],
        [0.9641652, 0.0576782, 0.7282211, 0.0243205, 0.6551436, 0.0301811],
        [0.0006062, 0.000001, 0.0001821, 0.0000006, 0.000096, 0.0000159],
        [0.5851815, 0.1100747, 0.3533757, 0.1051339, 0.4462156, 0.0849503],
    ]
)


def test_tcc_bilstm_equals_keras():
    """The second scorer (tcc-bilstm) reproduces toxic-comment-classifier run by Keras."""
    tcc = scoring.load_scorer({"scorer": "tcc-bilstm", "batch_size": 3})
    assert tcc.name == "tcc-bilstm"
    got = tcc.predict(TCC_TEXTS)
    np.testing.assert_allclose(got, TCC_KERAS, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(tcc.score(TCC_TEXTS), got[:, 0])  # P(toxic)
    with pytest.raises(ValueError, match="tox-block's"):
        tcc.predict(["x"], rescale=True)


def test_the_pairs_scorer_and_the_second_scorer():
    cfg = {"toxicity": {"scorer": "jigsaw-bilstm", "batch_size": 8}}
    assert scoring.pairs_scorer_settings(cfg) == {"scorer": "tcc-bilstm", "batch_size": 8}
    assert scoring.second_scorer_settings(cfg)["scorer"] == "tcc-bilstm"
    same = {**cfg, "dpo": {"pairs": {"scorer": "jigsaw-bilstm", "same_scorer": True}}}
    assert scoring.second_scorer_settings(same) is None
