"""Toxicity scorers behind one interface: ``load_scorer(cfg).score(texts)`` -> P(toxic).

``jigsaw-bilstm`` (offline default): the bidirectional LSTM of the PyPI package
``tox-block==0.1.2`` (Pascal Bliem, MIT), trained on the Jigsaw Toxic Comment Classification
data (6 labels: toxic, severe_toxic, obscene, threat, insult, identity_hate) with GloVe-initialised
embeddings. The package needs TensorFlow, so we run its two files ourselves: the Keras h5 weights
(read with h5py) in a torch re-implementation of the network, and the pickled Keras ``Tokenizer``
through a restricted unpickler feeding a re-implementation of ``texts_to_sequences`` and
``pad_sequences``. The score is the raw sigmoid output for ``toxic``; tox-block's min-max
"rescaling" is in :meth:`JigsawBiLSTMScorer.predict` only to compare with its README.

``detoxify``: Unitary's Detoxify models (``original``: BERT on the same Jigsaw data;
``unbiased``: RoBERTa, Jigsaw Unintended Bias; ``multilingual``: XLM-R). The checkpoint (GitHub
release file, or local ``toxicity.checkpoint``) is read with ``torch.load(weights_only=True)``,
not Detoxify's unrestricted loader; model and tokenizer are built with transformers. The score is
sigmoid of the ``toxicity`` logit, as ``Detoxify.predict`` computes it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import json
import pickle
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from dpotox.errors import ConfigError, SourceError

SCORERS = ("jigsaw-bilstm", "detoxify")
DETOXIFY_VARIANTS = ("original", "unbiased", "multilingual")
JIGSAW_LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
# tox-block's per-label (min, max) for its optional min-max rescaling (config.RESCALE_PROBA).
# Rescaled values are not probabilities (they can leave [0, 1]); kept for the README check only.
JIGSAW_RESCALE = np.array([(0.002116, 0.999858), (0.000011, 0.648682), (0.000347, 0.997533),
                           (0.000040, 0.918887), (0.000373, 0.986303), (0.000074, 0.901117)])
OFFLINE_HINT = "or use the offline scorer with `toxicity.scorer: jigsaw-bilstm`"


@runtime_checkable
class ToxicityScorer(Protocol):
    """What every scorer offers: a name for outputs and a batched ``score``."""

    name: str

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """float64 P(toxic) in [0, 1], one per text, in order (batched internally)."""
        ...


def _as_texts(texts: Sequence[str]) -> list[str]:
    # A bare string is a sequence of characters: scoring it letter by letter is never meant.
    if isinstance(texts, str):
        raise TypeError("score() takes a sequence of texts, not a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, not str")
    return texts


# ---------------------------------------------------------------- jigsaw-bilstm: tokenizer
class _TokenSequencerState:
    """Stand-in for tox-block's ``TokenSequencer``: only its attributes are used."""


class _KerasTokenizerState:
    """Stand-in for ``keras_preprocessing.text.Tokenizer``: only its attributes are used."""


# Exactly the globals that encoder_0.1.2.pkl references; anything else is refused unexecuted.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("tox_block.data_processing.preprocessors", "TokenSequencer"): _TokenSequencerState,
    ("keras_preprocessing.text", "Tokenizer"): _KerasTokenizerState,
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
            raise SourceError(f"{self._path}: refused to unpickle {module}.{name} (only {allowed} "
                              "are allowed); the file is not tox-block's tokenizer") from None


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
        self.vocab = {w: i for w, i in word_index.items()
                      if not self.num_words or i < self.num_words}
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
            seq = self.to_sequence(text)[-self.maxlen:]
            if seq:
                out[row, self.maxlen - len(seq):] = seq
        return out


def load_keras_tokenizer(path: Path) -> Any:
    """tox-block's pickled ``TokenSequencer`` with its Keras tokenizer, unpickled safely."""
    try:
        with path.open("rb") as fh:
            obj = RestrictedUnpickler(fh, path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise SourceError(f"{path}: cannot unpickle the Keras tokenizer: {err}") from err
    if not isinstance(obj, _TokenSequencerState) or not isinstance(
            getattr(obj, "tokenizer", None), _KerasTokenizerState):
        raise SourceError(f"{path}: expected tox-block's TokenSequencer holding a Keras Tokenizer")
    return obj


# ---------------------------------------------------------------- jigsaw-bilstm: network
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

        names = {"emb": ("embedding", "embeddings"), "dense_w": ("dense", "kernel"),
                 "dense_b": ("dense", "bias"), "out_w": ("dense_1", "kernel"),
                 "out_b": ("dense_1", "bias")}
        try:
            with h5py.File(path, "r") as f:
                layers = json.loads(f.attrs["model_config"])["config"]["layers"]
                w = f["model_weights"]
                get = lambda layer, name: torch.from_numpy(  # noqa: E731
                    np.asarray(w[layer][f"{layer}/{name}:0"], dtype=np.float64))
                self.w = {k: get(*v) for k, v in names.items()}
                for part in ("kernel", "recurrent_kernel", "bias"):  # [forward, backward]
                    self.w[part] = torch.stack([get("bidirectional", f"{d}_lstm/{part}")
                                                for d in ("forward", "backward")])
            by_class = {layer["class_name"]: layer["config"] for layer in layers}
            lstm = by_class["Bidirectional"]["layer"]["config"]
            self.seq_len = int(by_class["InputLayer"]["batch_input_shape"][1])
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise SourceError(f"{path}: not tox-block's Keras BiLSTM h5 file ({err!r})") from err
        # Refuse different semantics rather than produce plausible wrong scores.
        expected = {"activation": "tanh", "use_bias": True, "return_sequences": True,
                    "go_backwards": False}
        if (any(lstm.get(k) != v for k, v in expected.items())
                or lstm.get("recurrent_activation") not in ("hard_sigmoid", "sigmoid")
                or by_class["Embedding"].get("mask_zero") or "GlobalMaxPooling1D" not in by_class
                or by_class["Bidirectional"].get("merge_mode") != "concat"):
            raise SourceError(f"{path}: the Keras model config differs from tox-block 0.1.2's")
        hard = lstm["recurrent_activation"] == "hard_sigmoid"
        self.gate = _hard_sigmoid if hard else torch.sigmoid

    def to(self, device: str | torch.device) -> "KerasBiLSTM":
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
        raise SourceError(f"{tokenizer_path}: pads to {maxlen} tokens, the model takes "
                          f"{net.seq_len}")
    return KerasTextEncoder(state.tokenizer, maxlen, tokenizer_path), net


class JigsawBiLSTMScorer:
    """tox-block's Jigsaw BiLSTM; ``score`` is P(toxic), ``predict`` gives all 6 labels."""

    name = "jigsaw-bilstm"
    labels = JIGSAW_LABELS

    def __init__(self, encoder: KerasTextEncoder, net: KerasBiLSTM, *, batch_size: int = 64,
                 device: str | torch.device = "cpu") -> None:
        self.encoder, self.net = encoder, net.to(device)
        self.batch_size, self.device = batch_size, torch.device(device)

    def predict(self, texts: Sequence[str], *, rescale: bool = False) -> np.ndarray:
        """(n, 6) float64 label probabilities; ``rescale`` applies tox-block's min-max scaling."""
        texts = _as_texts(texts)
        ids = self.encoder.encode(texts)
        probs = np.zeros((len(texts), len(self.labels)))
        with _one_thread() if self.device.type == "cpu" else contextlib.nullcontext():
            for start in range(0, len(texts), self.batch_size):
                batch = torch.from_numpy(ids[start:start + self.batch_size]).to(self.device)
                probs[start:start + len(batch)] = self.net(batch).cpu().numpy()
        if rescale:
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


# ---------------------------------------------------------------- detoxify
# The (model, tokenizer) classes Detoxify's checkpoints name; a checkpoint's names are looked up
# in transformers only when they are on this list.
_DETOXIFY_ARCHS = {f"{a}ForSequenceClassification": f"{a}Tokenizer"
                   for a in ("Bert", "Roberta", "XLMRoberta", "Albert")}
# Buffers that older transformers saved and current ones recreate: safe to ignore.
_IGNORABLE_KEYS = ("position_ids", "token_type_ids")


class DetoxifyScorer:
    """A Detoxify model; ``score`` = sigmoid of its ``toxicity`` logit, as ``Detoxify.predict``."""

    def __init__(self, model: Any, tokenizer: Any, class_names: Sequence[str], *, name: str,
                 batch_size: int = 64, device: str | torch.device = "cpu") -> None:
        renames = {"toxic": "toxicity", "severe_toxic": "severe_toxicity",
                   "identity_hate": "identity_attack"}  # Detoxify's standard names
        self.class_names = [renames.get(c, c) for c in class_names]
        if "toxicity" not in self.class_names:
            raise SourceError(f"Detoxify checkpoint has no toxicity class: {self.class_names}")
        self.index = self.class_names.index("toxicity")
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.name, self.batch_size, self.device = name, batch_size, torch.device(device)
        # Hub tokenizers cap at 512 like Detoxify's; a bare local vocab has no cap, so use the
        # model's positions (RoBERTa reserves padding_idx + 1 of them).
        positions = getattr(model.config, "max_position_embeddings", 512)
        if model.config.model_type in ("roberta", "xlm-roberta"):
            positions -= model.config.pad_token_id + 1
        self.max_length = min(tokenizer.model_max_length, positions)

    @torch.inference_mode()
    def score(self, texts: Sequence[str]) -> np.ndarray:
        """float64 P(toxicity) per text, ``batch_size`` texts per forward pass."""
        texts = _as_texts(texts)
        out = np.zeros(len(texts))
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start:start + self.batch_size]
            enc = self.tokenizer(batch, return_tensors="pt", truncation=True, padding=True,
                                 max_length=self.max_length).to(self.device)
            logits = self.model(**enc).logits[:, self.index]
            out[start:start + len(batch)] = torch.sigmoid(logits.double()).cpu().numpy()
        return out


def _detoxify_checkpoint(variant: str, checkpoint: str | Path | None, device: str) -> dict:
    # weights_only=True: a checkpoint can then hold tensors and plain containers, never code.
    # (Detoxify itself loads with weights_only=False.)
    if checkpoint is None:
        from detoxify.detoxify import MODEL_URLS

        url = MODEL_URLS[variant]
        try:
            loaded = torch.hub.load_state_dict_from_url(url, map_location=device, weights_only=True)
        except OSError as err:  # URLError, ConnectionError, timeouts, SSL errors
            raise SourceError(
                f"the Detoxify checkpoint ({variant}) could not be downloaded from {url} (no "
                f"network?): {err}. Set config key `toxicity.checkpoint` to a local copy of that "
                f"file, {OFFLINE_HINT}") from err
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise SourceError(f"the Detoxify checkpoint from {url} cannot be loaded as weights "
                              f"only (pickled objects are refused): {err}") from err
        where = url
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise SourceError(f"config key `toxicity.checkpoint`: {str(path)!r} is not a file; "
                              f"give a local Detoxify checkpoint, {OFFLINE_HINT}")
        try:
            loaded = torch.load(path, map_location=device, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            raise SourceError(f"config key `toxicity.checkpoint`: {path} cannot be loaded as "
                              f"weights only (pickled objects are refused): {err}") from err
        where = f"config key `toxicity.checkpoint` ({path})"
    if not (isinstance(loaded, dict) and "config" in loaded and "state_dict" in loaded):
        raise SourceError(f"{where}: a Detoxify checkpoint holds 'config' and 'state_dict'")
    return loaded


def load_detoxify(variant: str = "original", *, checkpoint: str | Path | None = None,
                  tokenizer: str | Path | None = None, batch_size: int = 64,
                  device: str = "cpu") -> DetoxifyScorer:
    """A Detoxify scorer from a local or downloaded checkpoint.

    ``tokenizer`` is a local folder with the base model's Hugging Face ``config.json`` and
    tokenizer files (bert-base-uncased / roberta-base / xlm-roberta-base); without it they come
    from the hub or its cache. Raises SourceError naming the config key to change.
    """
    import transformers

    loaded = _detoxify_checkpoint(variant, checkpoint, device)
    try:
        arch = loaded["config"]["arch"]["args"]
        classes = list(loaded["config"]["dataset"]["args"]["classes"])
        model_name, tokenizer_name = arch["model_name"], arch["tokenizer_name"]
    except (KeyError, TypeError) as err:
        raise SourceError(f"Detoxify checkpoint config lacks {err}") from err
    if _DETOXIFY_ARCHS.get(model_name) != tokenizer_name:
        raise SourceError(f"Detoxify checkpoint names unsupported classes {model_name}, "
                          f"{tokenizer_name}")
    model_cls = getattr(transformers, model_name)
    source, local = (str(tokenizer), True) if tokenizer is not None else (arch["model_type"], False)
    try:
        config = model_cls.config_class.from_pretrained(
            source, num_labels=int(arch["num_classes"]), local_files_only=local)
        tok = getattr(transformers, tokenizer_name).from_pretrained(source, local_files_only=local)
    except Exception as err:  # hub, cache and file errors come in many types; all mean the same
        raise SourceError(
            f"cannot load the Hugging Face config and tokenizer of {source!r} for Detoxify "
            f"({str(err).rstrip('.')}). "
            "Set config key `toxicity.tokenizer` to a local folder with its config.json and "
            f"tokenizer files, {OFFLINE_HINT}") from err
    model = model_cls(config)
    try:
        result = model.load_state_dict(loaded["state_dict"], strict=False)
    except RuntimeError as err:  # shape mismatches
        raise SourceError(f"Detoxify checkpoint does not fit {model_name}: {err}") from err
    unexpected = [k for k in result.unexpected_keys if not k.endswith(_IGNORABLE_KEYS)]
    if result.missing_keys or unexpected:
        raise SourceError(f"Detoxify checkpoint does not fit {model_name}: missing "
                          f"{result.missing_keys[:5]}, unexpected {unexpected[:5]}")
    return DetoxifyScorer(model, tok, classes, name=f"detoxify-{variant}",
                          batch_size=batch_size, device=device)


def load_scorer(cfg: Mapping[str, Any], *, device: str = "cpu") -> ToxicityScorer:
    """The scorer that the validated ``toxicity`` config section asks for.

    Raises:
        ConfigError: unknown ``toxicity.scorer`` or ``toxicity.detoxify_variant``.
        SourceError: the scorer's files cannot be found, downloaded or read.
    """
    scorer = cfg.get("scorer", "jigsaw-bilstm")
    batch_size = int(cfg.get("batch_size") or 64)
    if scorer == "jigsaw-bilstm":
        return load_jigsaw_bilstm(batch_size=batch_size, device=device)
    if scorer == "detoxify":
        variant = cfg.get("detoxify_variant") or "original"
        if variant not in DETOXIFY_VARIANTS:
            raise ConfigError(f"config key 'toxicity.detoxify_variant': {variant!r} is not one "
                              f"of {', '.join(DETOXIFY_VARIANTS)}")
        return load_detoxify(variant, checkpoint=cfg.get("checkpoint"),
                             tokenizer=cfg.get("tokenizer"), batch_size=batch_size, device=device)
    raise ConfigError(f"config key 'toxicity.scorer': {scorer!r} is not a known scorer; "
                      f"choose one of {', '.join(SCORERS)}")
