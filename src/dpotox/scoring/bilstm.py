"""Two Keras BiLSTM toxicity scorers, run in torch from the files their PyPI packages carry.

- ``jigsaw-bilstm`` (the offline default): the bidirectional LSTM of ``tox-block==0.1.2``
  (Pascal Bliem, MIT), trained on the Jigsaw Toxic Comment Classification data (6 labels: toxic,
  severe_toxic, obscene, threat, insult, identity_hate) with GloVe-initialised embeddings; Keras
  2 h5 weights with their model config.
- ``tcc-bilstm``: the network of ``toxic-comment-classifier==0.3.0`` (Md Irfan Ali, MIT), the same
  design (embedding, BiLSTM(50), max pooling, dense 50, 6 sigmoids) trained separately on the
  same Jigsaw training set (its tokenizer counts 159,571 documents) with its own vocabulary and
  embeddings; Keras 3 ``.weights.h5`` (weights only: the architecture is that of the package's
  ``model.py``, sequence length 100). The second scorer: DPO's pairs are labelled by one, the
  evaluation by the other (docs/evaluation.md, "Two scorers").

Both packages need TensorFlow, so we run their files ourselves: the weights (read with h5py) in
one torch re-implementation of the network, and the pickled Keras ``Tokenizer`` through a
restricted unpickler feeding a re-implementation of ``texts_to_sequences`` and
``pad_sequences``. The score is the raw sigmoid output for ``toxic`` (toxic-comment-classifier's
own ``predict`` averages the 6 labels; we keep the label the other scorers give). tox-block's
min-max "rescaling" is in :meth:`JigsawBiLSTMScorer.predict` only to compare with its README.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpotox.errors import SourceError
from dpotox.scoring.base import as_texts

JIGSAW_LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
# tox-block's per-label (min, max) for its optional min-max rescaling (config.RESCALE_PROBA).
# Rescaled values are not probabilities (they can leave [0, 1]); kept for the README check only.
JIGSAW_RESCALE = np.array(
    [
        (0.002116, 0.999858),
        (0.000011, 0.648682),
        (0.000347, 0.997533),
        (0.000040, 0.918887),
        (0.000373, 0.986303),
        (0.000074, 0.901117),
    ]
)


class _TokenSequencerState:
    """Stand-in for tox-block's ``TokenSequencer``: only its attributes are used."""


class _KerasTokenizerState:
    """Stand-in for ``keras_preprocessing.text.Tokenizer``: only its attributes are used."""


# Exactly the globals that the two tokenizer pickles (tox-block's encoder_0.1.2.pkl and
# toxic-comment-classifier's tokenizer.pickle) reference; anything else is refused unexecuted.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("tox_block.data_processing.preprocessors", "TokenSequencer"): _TokenSequencerState,
    ("keras_preprocessing.text", "Tokenizer"): _KerasTokenizerState,
    ("keras.src.legacy.preprocessing.text", "Tokenizer"): _KerasTokenizerState,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "int"): int,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only the classes of tox-block's tokenizer pickle, mapped to inert stand-ins."""

    def __init__(self, fh: Any, path: Path) -> None:
        super().__init__(fh)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        """Return the allowed stand-in, or raise SourceError naming the refused global."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise SourceError(
                f"{self._path}: refused to unpickle {module}.{name} (only {allowed} "
                "are allowed); the file is not a Keras tokenizer of a known scorer"
            ) from None


class KerasTextEncoder:
    """Keras ``Tokenizer.texts_to_sequences`` + ``pad_sequences`` as tox-block used them."""

    def __init__(self, state: Any, maxlen: int, path: Path) -> None:
        try:
            word_index, oov_token = state.word_index, state.oov_token
            self.num_words, self.filters, self.lower = state.num_words, state.filters, state.lower
            self.split, self.char_level = state.split, state.char_level
        except AttributeError as err:
            raise SourceError(f"{path}: not a Keras Tokenizer pickle ({err})") from None
        self.maxlen = maxlen
        self.oov_index = word_index.get(oov_token) if oov_token is not None else None
        # Keras drops (or maps to OOV) every index >= num_words, so only those words matter;
        # keeping them alone turns 300k entries into 20k without changing any sequence.
        self.vocab = {
            w: i for w, i in word_index.items() if not self.num_words or i < self.num_words
        }
        self._table = str.maketrans({c: self.split for c in self.filters})

    def to_sequence(self, text: str) -> list[int]:
        """Word indices of one text (``texts_to_sequences``), unknown words dropped or OOV."""
        if self.lower:
            text = text.lower()
        if self.char_level:
            words: Sequence[str] = text
        else:
            words = [w for w in text.translate(self._table).split(self.split) if w]
        ids = (self.vocab.get(w, self.oov_index) for w in words)
        return [i for i in ids if i is not None]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, maxlen) int64, zero-padded and truncated at the front (Keras defaults 'pre')."""
        out = np.zeros((len(texts), self.maxlen), dtype=np.int64)
        for row, text in enumerate(texts):
            seq = self.to_sequence(text)[-self.maxlen :]
            if seq:
                out[row, self.maxlen - len(seq) :] = seq
        return out


def _unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            return RestrictedUnpickler(fh, path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise SourceError(f"{path}: cannot unpickle the Keras tokenizer: {err}") from err


def load_keras_tokenizer(path: Path) -> Any:
    """tox-block's pickled ``TokenSequencer`` with its Keras tokenizer, unpickled safely."""
    obj = _unpickle(path)
    if not isinstance(obj, _TokenSequencerState) or not isinstance(
        getattr(obj, "tokenizer", None), _KerasTokenizerState
    ):
        raise SourceError(f"{path}: expected tox-block's TokenSequencer holding a Keras Tokenizer")
    return obj


# -- the network ----------------------------------------------------------------------
@contextlib.contextmanager
def _one_thread() -> Any:
    # The recurrent steps are ~1 MFLOP matmuls: extra OpenMP threads cost more than they save,
    # and when other jobs share the cores they stall (measured: 36 vs 850 texts/s on 2 cores).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    # Keras 2.2.4-tf's definition (Keras 3 changed it to relu6(x + 3) / 6).
    return torch.clamp(0.2 * x + 0.5, 0.0, 1.0)


class KerasBiLSTM:
    """Embedding -> Bidirectional(LSTM, concat) -> GlobalMaxPool1D -> Dense(relu) -> Dense(sigmoid).

    Weights stay in float64: results then do not depend on the batch size (no float32 BLAS
    blocking differences) and still match the float32 Keras outputs to ~1e-6.
    """

    def __init__(self, path: Path) -> None:
        import h5py

        names = {
            "emb": ("embedding", "embeddings"),
            "dense_w": ("dense", "kernel"),
            "dense_b": ("dense", "bias"),
            "out_w": ("dense_1", "kernel"),
            "out_b": ("dense_1", "bias"),
        }
        try:
            with h5py.File(path, "r") as f:
                layers = json.loads(f.attrs["model_config"])["config"]["layers"]
                w = f["model_weights"]

                def get(layer, name):
                    return torch.from_numpy(
                        np.asarray(w[layer][f"{layer}/{name}:0"], dtype=np.float64)
                    )

                self.w = {k: get(*v) for k, v in names.items()}
                for part in ("kernel", "recurrent_kernel", "bias"):  # [forward, backward]
                    self.w[part] = torch.stack(
                        [get("bidirectional", f"{d}_lstm/{part}") for d in ("forward", "backward")]
                    )
            by_class = {layer["class_name"]: layer["config"] for layer in layers}
            lstm = by_class["Bidirectional"]["layer"]["config"]
            self.seq_len = int(by_class["InputLayer"]["batch_input_shape"][1])
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise SourceError(f"{path}: not tox-block's Keras BiLSTM h5 file ({err!r})") from err
        # Refuse different semantics rather than produce plausible wrong scores.
        expected = {
            "activation": "tanh",
            "use_bias": True,
            "return_sequences": True,
            "go_backwards": False,
        }
        if (
            any(lstm.get(k) != v for k, v in expected.items())
            or lstm.get("recurrent_activation") not in ("hard_sigmoid", "sigmoid")
            or by_class["Embedding"].get("mask_zero")
            or "GlobalMaxPooling1D" not in by_class
            or by_class["Bidirectional"].get("merge_mode") != "concat"
        ):
            raise SourceError(f"{path}: the Keras model config differs from tox-block 0.1.2's")
        hard = lstm["recurrent_activation"] == "hard_sigmoid"
        self.gate = _hard_sigmoid if hard else torch.sigmoid

    @classmethod
    def from_keras3_weights(cls, path: Path, seq_len: int) -> KerasBiLSTM:
        """The network from a Keras 3 ``.weights.h5`` file (weights by layer name, no model
        config): toxic-comment-classifier's. Keras 3's LSTM gates are sigmoids; the layers and
        sequence length are its ``model.py``'s, checked against the weights' shapes."""
        import h5py

        net = cls.__new__(cls)
        try:
            with h5py.File(path, "r") as f:
                layers = f["layers"]

                def get(name: str, i: int) -> torch.Tensor:
                    return torch.from_numpy(np.asarray(layers[name]["vars"][str(i)], np.float64))

                net.w = {
                    "emb": get("embedding", 0),
                    "dense_w": get("dense", 0),
                    "dense_b": get("dense", 1),
                    "out_w": get("dense_1", 0),
                    "out_b": get("dense_1", 1),
                }
                for i, part in enumerate(("kernel", "recurrent_kernel", "bias")):
                    net.w[part] = torch.stack(
                        [get(f"bidirectional/{d}_layer/cell", i) for d in ("forward", "backward")]
                    )
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise SourceError(f"{path}: not a Keras 3 BiLSTM weights file ({err!r})") from err
        units = net.w["recurrent_kernel"].shape[1]
        shapes_ok = (
            net.w["kernel"].shape[-1] == 4 * units
            and net.w["dense_w"].shape[0] == 2 * units
            and net.w["out_w"].shape[1] == len(JIGSAW_LABELS)
        )
        if not shapes_ok:
            raise SourceError(f"{path}: the weights' shapes are not those of a 6-label BiLSTM")
        net.seq_len, net.gate = seq_len, torch.sigmoid
        return net

    def to(self, device: str | torch.device) -> KerasBiLSTM:
        """A copy with its weights on ``device`` (the loaded original is cached and shared)."""
        moved = copy.copy(self)
        moved.w = {k: v.to(device) for k, v in self.w.items()}
        return moved

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq_len) token ids -> (batch, 6) label probabilities."""
        w = self.w
        x = w["emb"][ids]
        # Both directions in one loop: index 0 reads left to right, index 1 right to left
        # (go_backwards). Max pooling ignores time order, so the backward outputs need no flip.
        xz = torch.stack([x, x.flip(1)]) @ w["kernel"].unsqueeze(1) + w["bias"][:, None, None]
        h = x.new_zeros(2, ids.shape[0], w["recurrent_kernel"].shape[1])
        c = torch.zeros_like(h)
        pooled = torch.full_like(h, -torch.inf)
        for t in range(ids.shape[1]):  # padding steps included: Keras ran them (no mask)
            i, f, g, o = (xz[:, :, t] + torch.bmm(h, w["recurrent_kernel"])).chunk(4, dim=-1)
            c = self.gate(f) * c + self.gate(i) * torch.tanh(g)
            h = self.gate(o) * torch.tanh(c)
            pooled = torch.maximum(pooled, h)
        hidden = torch.relu(torch.cat([pooled[0], pooled[1]], -1) @ w["dense_w"] + w["dense_b"])
        return torch.sigmoid(hidden @ w["out_w"] + w["out_b"])  # dropout: off at inference


@functools.lru_cache(maxsize=2)
def _jigsaw_parts(tokenizer_path: Path, model_path: Path) -> tuple[KerasTextEncoder, KerasBiLSTM]:
    net = KerasBiLSTM(model_path)
    state = load_keras_tokenizer(tokenizer_path)
    maxlen = getattr(state, "max_sequence_length", net.seq_len)
    if maxlen != net.seq_len:
        raise SourceError(
            f"{tokenizer_path}: pads to {maxlen} tokens, the model takes {net.seq_len}"
        )
    return KerasTextEncoder(state.tokenizer, maxlen, tokenizer_path), net


class JigsawBiLSTMScorer:
    """A Jigsaw BiLSTM (tox-block's, or toxic-comment-classifier's with ``name``
    ``tcc-bilstm``); ``score`` is P(toxic), ``predict`` gives all 6 labels."""

    labels = JIGSAW_LABELS

    def __init__(
        self,
        encoder: KerasTextEncoder,
        net: KerasBiLSTM,
        *,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        name: str = "jigsaw-bilstm",
    ) -> None:
        self.name = name
        self.encoder, self.net = encoder, net.to(device)
        self.batch_size, self.device = batch_size, torch.device(device)

    def predict(self, texts: Sequence[str], *, rescale: bool = False) -> np.ndarray:
        """(n, 6) float64 label probabilities; ``rescale`` applies tox-block's min-max scaling."""
        texts = as_texts(texts)
        ids = self.encoder.encode(texts)
        probs = np.zeros((len(texts), len(self.labels)))
        with _one_thread() if self.device.type == "cpu" else contextlib.nullcontext():
            for start in range(0, len(texts), self.batch_size):
                batch = torch.from_numpy(ids[start : start + self.batch_size]).to(self.device)
                probs[start : start + len(batch)] = self.net(batch).cpu().numpy()
        if rescale:
            if self.name != "jigsaw-bilstm":
                raise ValueError("the min-max rescaling is tox-block's, not this scorer's")
            lo, hi = JIGSAW_RESCALE.T
            probs = np.abs((probs - lo) / (hi - lo))
        return probs

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """float64 P(toxic) per text. A text without known words (e.g. "") gets the score of
        an all-padding input, 0.0195."""
        return self.predict(texts)[:, 0]


def load_jigsaw_bilstm(*, batch_size: int = 64, device: str = "cpu") -> JigsawBiLSTMScorer:
    """The offline scorer, from tox-block's sha256-checked files (the package is not imported)."""
    from dpotox.sources import assets

    tokenizer_path, model_path = assets.asset_paths("jigsaw-bilstm")
    encoder, net = _jigsaw_parts(tokenizer_path, model_path)
    return JigsawBiLSTMScorer(encoder, net, batch_size=batch_size, device=device)


# toxic-comment-classifier's model.py: MAXLEN (the weights file does not record it).
TCC_SEQ_LEN = 100


@functools.lru_cache(maxsize=2)
def _tcc_parts(tokenizer_path: Path, model_path: Path) -> tuple[KerasTextEncoder, KerasBiLSTM]:
    net = KerasBiLSTM.from_keras3_weights(model_path, TCC_SEQ_LEN)
    state = _unpickle(tokenizer_path)
    if not isinstance(state, _KerasTokenizerState):
        raise SourceError(f"{tokenizer_path}: expected a pickled Keras Tokenizer")
    encoder = KerasTextEncoder(state, TCC_SEQ_LEN, tokenizer_path)
    if encoder.num_words != net.w["emb"].shape[0]:
        raise SourceError(
            f"{tokenizer_path}: keeps {encoder.num_words} words, the embedding has "
            f"{net.w['emb'].shape[0]} rows"
        )
    return encoder, net


def load_tcc_bilstm(*, batch_size: int = 64, device: str = "cpu") -> JigsawBiLSTMScorer:
    """The second offline scorer (``tcc-bilstm``), from toxic-comment-classifier's
    sha256-checked files (the package is not imported)."""
    from dpotox.sources import assets

    tokenizer_path, model_path = assets.asset_paths("tcc-bilstm")
    encoder, net = _tcc_parts(tokenizer_path, model_path)
    return JigsawBiLSTMScorer(encoder, net, batch_size=batch_size, device=device, name="tcc-bilstm")
