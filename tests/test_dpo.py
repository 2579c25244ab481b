"""DPO training (dpotox.stages.dpo) on tiny random-weight models: a GPT-2 with the real GPT-2
tokenizer and a Llama with a small byte-level BPE tokenizer trained here."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import prepared_gpt2, tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, TrainerCallback

from dpotox.errors import ConfigError
from dpotox.sources import prepare_model
from dpotox.sources.models import load_prepared
from dpotox.stages.dpo import DPOError, DPOSettings, checkpoints, split_pairs, train_dpo
from dpotox.stages.dpo.trainer import k3_kl, make_trainer

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = [
    "The neighbour",
    "My teacher",
    "That driver",
    "Our new boss",
    "The waiter",
    "His cousin",
    "Hi",
    "A stranger",
    "The referee",
    "Her landlord",
    "The pilot",
    "My dentist",
]
# An easy preference: always the polite continuation over the rude one.
PAIRS = pd.DataFrame(
    {
        "prompt": [f"{s} said that you are" for s in SUBJECTS] * 2,
        "chosen": [" kind and helpful today", " a good friend to all"] * len(SUBJECTS),
        "rejected": [" a stupid ugly idiot", " rude and nasty trash"] * len(SUBJECTS),
        "source": "test",
    }
)
# Fast defaults for the tests; each test changes what it exercises.
FAST = dict(
    learning_rate=3e-3,
    optimizer="adamw",
    warmup_steps=0,
    batch_size=4,
    gradient_accumulation_steps=1,
    eval_batch_size=8,
    max_steps=6,
    eval_steps=3,
    save_steps=3,
    early_stopping_patience=10,
    validation_fraction=0.25,
    kl_weight=0.0,
    kl="k3",  # the full KL has its own tests; k3 also runs with a precomputed reference
)


def small_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of ~300 tokens that adds BOS, as Llama tokenizers do."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        list(PAIRS["prompt"]) + list(PAIRS["chosen"]) + list(PAIRS["rejected"]),
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<s>", "</s>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return prepared_gpt2(tmp_path_factory.mktemp("dpo-gpt2"), "tiny-gpt2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-llama")
    tok = small_tokenizer()
    tiny_model("llama", vocab=len(tok)).save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    return prepare_model(
        "tiny-llama",
        {
            "source": {"kind": "local", "path": str(root / "src")},
            "family": "llama",
            "dtype": "float32",
        },
        root / "base",
    )


def reversed_validation(pairs=PAIRS, fraction=FAST["validation_fraction"], seed=0):
    """``pairs`` whose validation rows (under train_dpo's split) prefer the rude completion:
    the more the model learns, the worse its validation loss."""
    _, val = split_pairs(pairs.assign(row=range(len(pairs))), fraction, seed)
    flip = pairs.index.isin(val["row"])
    out = pairs.copy()
    out.loc[flip, ["chosen", "rejected"]] = pairs.loc[flip, ["rejected", "chosen"]].to_numpy()
    return out


def run(model_dir, tmp_path, name="run", pairs=PAIRS, **changes):
    """train_dpo with FAST settings; returns (summary, log table, paths)."""
    extra = {k: changes.pop(k) for k in ("callbacks", "keep_checkpoints") if k in changes}
    settings = DPOSettings(**{**FAST, **changes})
    out, log_path, ckpt = (
        tmp_path / name / "dpo",
        tmp_path / name / "log.parquet",
        tmp_path / name / "ckpt",
    )
    summary = train_dpo(
        model_dir,
        pairs,
        out,
        settings,
        checkpoint_dir=ckpt,
        log_path=log_path,
        device="cpu",
        **extra,
    )
    return summary, pd.read_parquet(log_path), (out, log_path, ckpt)


class Interrupt(TrainerCallback):
    """Fails the run when it reaches ``step`` (before that step's evaluation and checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated interruption")


# ---- settings -------------------------------------------------------------------------------


def test_settings_from_config_with_model_overrides():
    cfg = {
        "seed": 7,
        "models": {
            "gpt2": {"dpo": {"kl_weight": 0.02}},
            "llama": {"dpo": {"kl_weight": 0.1, "learning_rate": 2e-6}},
            "plain": {},
        },
        "dpo": {
            "beta": 0.2,
            "kl_weight": 0.05,
            "learning_rate": 1e-6,
            "max_steps": 100,
            "pairs": {"method": "best-of-n", "n_prompts": 4},
        },
    }
    gpt2 = DPOSettings.from_config(cfg, "gpt2")
    assert (gpt2.kl_weight, gpt2.learning_rate, gpt2.beta, gpt2.seed, gpt2.max_steps) == (
        0.02,
        1e-6,
        0.2,
        7,
        100,
    )
    llama = DPOSettings.from_config(cfg, "llama")
    assert (llama.kl_weight, llama.learning_rate) == (0.1, 2e-6)
    plain = DPOSettings.from_config(cfg, "plain")
    assert (plain.kl_weight, plain.optimizer, plain.warmup_steps, plain.save_steps) == (
        0.05,
        "rmsprop",
        150,
        50,
    )
    assert DPOSettings.from_config({"models": {"m": {}}}, "m") == DPOSettings()


@pytest.mark.parametrize(
    "changes, keys",
    [
        (
            {"max_prompt_length": 200, "max_completion_length": 100},
            [
                "'dpo.max_prompt_length' (200)",
                "'dpo.max_completion_length' (100)",
                "'dpo.max_length' (256)",
            ],
        ),
        ({"save_steps": 30, "eval_steps": 20}, ["'dpo.save_steps' (30)", "'dpo.eval_steps' (20)"]),
        ({"optimizer": "sgd"}, ["'dpo.optimizer': got 'sgd'"]),
        ({"max_steps": 0, "batch_size": 0}, ["'dpo.max_steps': got 0", "'dpo.batch_size': got 0"]),
        (
            {"validation_fraction": 1.0},
            ["'dpo.validation_fraction': got 1.0, expected a number in (0, 1)"],
        ),
        ({"epochs": 2.5}, ["'dpo.epochs': got 2.5, expected an integer >= 1"]),
    ],
)
def test_settings_errors_name_the_keys(changes, keys):
    with pytest.raises(ConfigError) as err:
        DPOSettings(**changes)
    for key in keys:
        assert key in str(err.value)


def test_config_errors_name_per_model_and_unknown_keys():
    with pytest.raises(ConfigError, match=r"'models\.m\.dpo\.kl_weight': got -1"):
        DPOSettings.from_config({"models": {"m": {"dpo": {"kl_weight": -1}}}, "dpo": {}}, "m")
    with pytest.raises(ConfigError, match="unknown key.*'lr'"):
        DPOSettings.from_config({"models": {"m": {}}, "dpo": {"lr": 1e-3}}, "m")
    with pytest.raises(ConfigError, match="no model 'x'"):
        DPOSettings.from_config({"models": {"m": {}}}, "x")


def test_effective_batch_is_the_same_on_any_number_of_gpus():
    from dpotox.stages.dpo import accumulation_per_process

    settings = DPOSettings(batch_size=4, gradient_accumulation_steps=4)
    assert [accumulation_per_process(settings, n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(DPOError, match="dpo.gradient_accumulation_steps' is 4, which 8 GPUs"):
        accumulation_per_process(settings, 8)


def test_split_pairs_is_seeded_disjoint_and_keeps_one_of_each():
    pairs = PAIRS.assign(i=range(len(PAIRS)))
    train, val = split_pairs(pairs, 0.25, seed=3)
    assert (len(train), len(val)) == (18, 6)
    assert sorted(train["i"].tolist() + val["i"].tolist()) == list(range(24))
    assert val["i"].tolist() == split_pairs(pairs, 0.25, seed=3)[1]["i"].tolist()
    assert val["i"].tolist() != split_pairs(pairs, 0.25, seed=4)[1]["i"].tolist()
    assert [len(x) for x in split_pairs(pairs.head(2), 0.01, 0)] == [1, 1]
    assert [len(x) for x in split_pairs(pairs.head(3), 0.99, 0)] == [1, 2]
    with pytest.raises(DPOError, match="at least 2 preference pairs"):
        split_pairs(pairs.head(1), 0.1, 0)


# ---- the loss and the data ------------------------------------------------------------------


def reference_kl(trainer, batch):
    """k3 KL per completion token, from full logits (independent of TRL's fused head)."""

    def logps(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return (
            torch.log_softmax(logits[:, :-1].float(), -1)
            .gather(-1, batch["input_ids"][:, 1:, None])
            .squeeze(-1)
        )

    with torch.no_grad():
        r = logps(trainer.ref_model) - logps(trainer.model)
    mask = batch["completion_mask"][:, 1:].float()
    return float(((torch.exp(r) - r - 1) * mask).sum() / mask.sum())


def reference_full_kl(trainer, batch):
    """Yang et al.'s KL from full logits: per sequence the mean over its completion tokens of
    KL(reference || policy) over the vocabulary; chosen plus rejected per pair, mean over
    pairs. Written out directly, independent of the trainer's code."""
    with torch.no_grad():
        lp = {
            name: torch.log_softmax(
                m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                .logits[:, :-1]
                .double(),
                -1,
            )
            for name, m in (("policy", trainer.model), ("ref", trainer.ref_model))
        }
    per_pos = (lp["ref"].exp() * (lp["ref"] - lp["policy"])).sum(-1)
    mask = batch["completion_mask"][:, 1:].double()
    per_seq = (per_pos * mask).sum(1) / mask.sum(1)
    return float(per_seq.sum() / (len(per_seq) // 2))


def _kl_trainer(model_dir, tmp_path, kl: str):
    """A trainer with KL weight 0.5 and a batch of 4 pairs (8 sequences)."""
    train, val = split_pairs(PAIRS, 0.25, 0)
    settings = DPOSettings(**{**FAST, "kl_weight": 0.5, "kl": kl})
    trainer = make_trainer(model_dir, train, val, settings, checkpoint_dir=tmp_path, device="cpu")
    return trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(4)])


def _nudge(model) -> None:
    """Move the policy off the reference."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05, alpha=1.0)


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """Gemma-2 soft-caps its logits (final_logit_softcapping): the full KL must too."""
    root = tmp_path_factory.mktemp("dpo-gemma2")
    tok = small_tokenizer()
    model = tiny_model("gemma2", vocab=len(tok))
    # A cap this low bends the tiny model's logits (30, Gemma-2's own, would leave them be).
    model.config.final_logit_softcapping = 0.05
    model.save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    spec = {"source": {"kind": "local", "path": str(root / "src")}, "family": "gemma2"}
    return prepare_model("tiny-gemma2", {**spec, "dtype": "float32"}, root / "base")


@pytest.mark.parametrize("model_name", ["gpt2", "llama", "gemma2"])
def test_full_kl_is_the_exact_kl_over_the_vocabulary(model_name, request, tmp_path):
    from trl import DPOTrainer

    model_dir = request.getfixturevalue(f"{model_name}_dir")
    trainer, batch = _kl_trainer(model_dir, tmp_path, "full")
    trainer._compute_loss(trainer.model, batch, False)
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(0, abs=1e-6)  # policy = reference
    _nudge(trainer.model)
    want = reference_full_kl(trainer, batch)
    trl_loss = DPOTrainer._compute_loss(trainer, trainer.model, batch, False)
    ours = trainer._compute_loss(trainer.model, batch, False)
    assert want > 1e-3
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(want, rel=1e-4)
    assert (ours - trl_loss).item() == pytest.approx(0.5 * want, rel=1e-3)
    # Larger than the k3 average at the tokens themselves: it sums both sides of a pair and
    # weighs every token of the vocabulary.
    assert want > reference_kl(trainer, batch)
    ours.backward()  # the KL term reaches the policy's parameters, never the reference's
    assert all(p.grad is None for p in trainer.ref_model.parameters())


def test_kl_must_be_full_or_k3():
    with pytest.raises(ConfigError, match="'dpo.kl'"):
        DPOSettings(**{**FAST, "kl": "exact"})


def test_kl_term_on_top_of_trl_loss(gpt2_dir, tmp_path):
    from trl import DPOTrainer

    trainer, batch = _kl_trainer(gpt2_dir, tmp_path, "k3")
    trl_loss = DPOTrainer._compute_loss(trainer, trainer.model, batch, False)
    ours = trainer._compute_loss(trainer.model, batch, False)
    # At step 0 the policy is the reference: KL is 0 and the loss is TRL's (log 2).
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(0, abs=1e-7)
    # (CPU kernels are not bit-reproducible from call to call, hence the tolerance.)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert ours.item() == pytest.approx(0.693147, abs=1e-4)

    _nudge(trainer.model)
    kl = reference_kl(trainer, batch)
    trl_loss = DPOTrainer._compute_loss(trainer, trainer.model, batch, False)
    ours = trainer._compute_loss(trainer.model, batch, False)
    assert kl > 1e-3
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(kl, rel=1e-3)
    assert (ours - trl_loss).item() == pytest.approx(0.5 * kl, rel=1e-3)
    ours.backward()  # the KL term reaches the policy's parameters, never the reference's
    assert all(p.grad is None for p in trainer.ref_model.parameters())

    trainer.kl_weight = 0.0  # plain DPO: exactly TRL's loss
    assert float(trainer._compute_loss(trainer.model, batch, False)) == float(
        DPOTrainer._compute_loss(trainer, trainer.model, batch, False)
    )


def test_k3_is_non_negative_and_masked():
    policy = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -9.0]])
    total, n = k3_kl(policy, ref, torch.tensor([[1, 1, 0]]))
    r = torch.tensor(-0.5)
    assert n == 2 and float(total) == pytest.approx(float(torch.exp(r) - r - 1))


def test_prompt_and_completion_budgets(llama_dir, tmp_path):
    tok = load_prepared(llama_dir)[1]
    long_prompt = "Our new boss said that you are a good friend to all and kind and helpful"
    pairs = pd.DataFrame(
        {
            "prompt": [long_prompt, "Hi"],
            "chosen": [" kind and helpful today", " a" + tok.eos_token],
            "rejected": [" a stupid ugly idiot", " rude"],
        }
    )
    settings = DPOSettings(**{**FAST, "max_prompt_length": 5, "max_completion_length": 3})
    trainer = make_trainer(llama_dir, pairs, pairs, settings, checkpoint_dir=tmp_path, device="cpu")
    long, short = trainer.train_dataset[0], trainer.train_dataset[1]
    full, short_full = tok(long_prompt)["input_ids"], tok("Hi")["input_ids"]
    assert len(short_full) <= 5
    assert full[0] == tok.bos_token_id and len(full) > 5
    assert long["prompt_ids"] == [tok.bos_token_id] + full[-4:]  # BOS kept, the rest from the end
    assert (
        long["chosen_ids"]
        == tok(long_prompt + " kind and helpful today")["input_ids"][len(full) :][:3]
    )
    assert tok.eos_token_id not in long["rejected_ids"]  # TRL's appended EOS is taken off again
    assert short["prompt_ids"] == short_full
    assert short["chosen_ids"] == tok("Hi a" + tok.eos_token)["input_ids"][len(short_full) :]
    assert short["chosen_ids"][-1] == tok.eos_token_id  # an EOS in the text itself stays
    assert tok.eos_token_id not in short["rejected_ids"]


# ---- training -------------------------------------------------------------------------------


def test_gpt2_training_writes_a_loadable_model_and_the_log(gpt2_dir, tmp_path):
    summary, table, (out, log_path, ckpt) = run(
        gpt2_dir, tmp_path, max_steps=2, eval_steps=2, save_steps=2, kl_weight=0.1
    )
    assert (
        summary["steps"] == 2 and summary["resumed_from_step"] == 0 and not summary["stopped_early"]
    )
    assert (summary["n_train"], summary["n_val"]) == (18, 6)
    assert summary["best_step"] == 2 and summary["best_eval_loss"] is not None
    model, tok = load_prepared(out)
    meta = json.loads((out / "source.json").read_text())
    assert meta["name"] == "tiny-gpt2" and meta["family"] == "gpt2" and meta["dtype"] == "float32"
    assert meta["dpo"]["steps"] == 2 and meta["dpo"]["settings"]["kl_weight"] == 0.1
    base = load_prepared(gpt2_dir)[0]
    assert not torch.equal(
        model.transformer.h[0].mlp.c_proj.weight, base.transformer.h[0].mlp.c_proj.weight
    )
    assert list(table.columns[:12]) == [
        "step",
        "epoch",
        "split",
        "loss",
        "dpo_loss",
        "kl",
        "rewards/margins",
        "rewards/accuracies",
        "rewards/chosen",
        "rewards/rejected",
        "learning_rate",
        "grad_norm",
    ]
    assert table["split"].tolist() == ["train"] * 2 + ["eval"]
    assert table["kl"].iloc[0] == pytest.approx(0, abs=1e-7) and table["kl"].iloc[1] > 0
    train = table[table["split"] == "train"]
    assert (train["loss"] - train["dpo_loss"] - 0.1 * train["kl"]).abs().max() < 1e-5
    assert not ckpt.exists()  # checkpoints are scratch once the model is written
    assert sorted(p.name for p in out.parent.iterdir()) == ["dpo", "log.parquet"]


def test_one_step_on_a_family_beyond_the_papers(tmp_path):
    """Pythia's family (GPT-NeoX: parallel attention and MLP, biases everywhere) trains through
    the same path: one step changes the MLP weights and the result prepares as a model."""
    tok = small_tokenizer()
    tiny_model("gpt_neox", vocab=len(tok)).save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    base = prepare_model(
        "tiny-pythia",
        {
            "source": {"kind": "local", "path": str(tmp_path / "src")},
            "family": "gpt_neox",
            "dtype": "float32",
        },
        tmp_path / "base",
    )
    summary, table, (out, _, _) = run(
        base, tmp_path, max_steps=1, eval_steps=1, save_steps=1, kl_weight=0.1
    )
    assert summary["steps"] == 1 and table["loss"].notna().all()
    trained, reference = load_prepared(out)[0], load_prepared(base)[0]
    mlp = "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"
    assert not torch.equal(trained.state_dict()[mlp], reference.state_dict()[mlp])
    assert json.loads((out / "source.json").read_text())["family"] == "gpt_neox"


def test_llama_learns_easy_pairs(llama_dir, tmp_path):
    summary, table, _ = run(
        llama_dir, tmp_path, max_steps=12, eval_steps=4, save_steps=4, kl_weight=0.05
    )
    evals = table[table["split"] == "eval"]
    assert evals["step"].tolist() == [4, 8, 12]
    assert evals["loss"].iloc[-1] < evals["loss"].iloc[0] < 0.69
    assert evals["rewards/accuracies"].iloc[-1] == 1.0
    assert evals["rewards/margins"].is_monotonic_increasing
    assert (
        summary["eval_reward_accuracy"] == 1.0 and summary["best_eval_loss"] == evals["loss"].min()
    )
    train = table[table["split"] == "train"]
    assert train["kl"].iloc[0] == pytest.approx(0, abs=1e-7) and (train["kl"].iloc[3:] > 1e-4).all()
    assert table["learning_rate"].dropna().eq(3e-3).all()  # no warmup asked, constant after it


@pytest.mark.parametrize("kl", ["k3", "full"])
def test_precomputed_reference_trains_as_the_live_reference(llama_dir, tmp_path, kl):
    """One reference pass before training (then the reference is freed) gives the losses, KL
    and weights of a reference forward at every step, for either KL term (the full one from
    the stored hidden states and the reference's own output embedding)."""
    kw = dict(max_steps=6, eval_steps=3, save_steps=3, kl_weight=0.5, kl=kl)
    live, live_table, (live_out, _, _) = run(llama_dir, tmp_path, "live", **kw)
    pre, pre_table, (pre_out, _, _) = run(
        llama_dir, tmp_path, "pre", precompute_ref_log_probs=True, **kw
    )
    cols = ["loss", "dpo_loss", "kl", "rewards/margins"]
    assert pre_table["kl"].iloc[-1] > 1e-4  # the KL term is exercised
    pd.testing.assert_frame_equal(pre_table[["step", "split"]], live_table[["step", "split"]])
    for col in cols:
        both = pd.concat([pre_table[col], live_table[col]], axis=1).dropna()
        assert len(both) and ((both.iloc[:, 0] - both.iloc[:, 1]).abs() < 1e-4).all(), col
    a, b = load_file(live_out / "model.safetensors"), load_file(pre_out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    assert pre["steps"] == live["steps"] == 6


def test_precompute_frees_the_reference(llama_dir, tmp_path):
    train, val = split_pairs(PAIRS, 0.25, 0)
    settings = DPOSettings(**{**FAST, "precompute_ref_log_probs": True})
    trainer = make_trainer(llama_dir, train, val, settings, checkpoint_dir=tmp_path, device="cpu")
    assert trainer.ref_model is None and trainer.precompute_ref_logps
    example = trainer.train_dataset[0]
    batch = trainer.data_collator([example])
    assert len(example["ref_chosen_tokens"]) == int(batch["completion_mask"][0].sum())
    assert example["ref_chosen_logps"] == pytest.approx(sum(example["ref_chosen_tokens"]), abs=1e-4)
    assert "ref_chosen_hidden" not in example  # k3 needs no hidden states
    with pytest.raises(ConfigError, match="dpo.precompute_ref_log_probs"):
        DPOSettings(**{**FAST, "precompute_ref_log_probs": "yes"})


def test_warmup_is_linear_then_constant(llama_dir, tmp_path):
    _, table, _ = run(
        llama_dir,
        tmp_path,
        max_steps=6,
        eval_steps=6,
        save_steps=6,
        warmup_steps=4,
        optimizer="rmsprop",
        learning_rate=1e-4,
    )
    lr = table.loc[table["split"] == "train", "learning_rate"].tolist()
    # The logged rate is the one the step used: 0, 1/4, 2/4, 3/4 of the peak, then the peak.
    assert lr == pytest.approx([0, 2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4])


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(llama_dir, tmp_path):
    """The command rule train_dpo runs, started twice by `accelerate launch` as on a node with
    two GPUs (here two CPU processes over gloo: accelerate uses FSDP on GPUs only): the
    processes form one group, share the effective batch, and process 0 alone writes."""
    import subprocess
    import sys

    PAIRS.to_parquet(tmp_path / "pairs.parquet")
    # The repository's FSDP launch config, on CPUs: torchrun starts the processes, which
    # accelerate then joins over gloo (it shards with FSDP on GPUs only).
    launch = yaml.safe_load((REPO / "config" / "accelerate" / "fsdp.yaml").read_text())
    launch_cfg = tmp_path / "fsdp-cpu.yaml"
    launch_cfg.write_text(yaml.safe_dump({**launch, "use_cpu": True, "mixed_precision": "no"}))
    dpo = {
        **FAST,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 4,
        "eval_steps": 2,
        "save_steps": 2,
        "kl_weight": 0.1,
        "precompute_ref_log_probs": True,
    }
    cfg = {"seed": 0, "models": {"tiny": {"family": "llama"}}, "dpo": dpo}
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(launch_cfg),
        "--num_processes",
        "2",
        "-m",
        "dpotox",
        "train-dpo",
        "--model-name",
        "tiny",
        "--config-json",
        json.dumps(cfg),
        "--base",
        str(llama_dir),
        "--pairs",
        str(tmp_path / "pairs.parquet"),
        "--out",
        str(out),
        "--train-log",
        str(tmp_path / "log.parquet"),
        "--checkpoints",
        str(tmp_path / "ckpt"),
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # 2 pairs x (2 accumulation steps / 2 processes) x 2 processes: the configured batch of 4
    assert "effective batch 4 (2 pairs x 1 accumulated x 2 processes)" in log, log[-4000:]
    assert "reference model freed" in log
    table = pd.read_parquet(tmp_path / "log.parquet")
    assert table[table["split"] == "eval"]["step"].tolist() == [2, 4]
    model, _ = load_prepared(out)
    assert json.loads((out / "source.json").read_text())["dpo"]["steps"] == 4
    assert not (tmp_path / "ckpt").exists()


def test_resume_after_an_interruption(llama_dir, tmp_path):
    changes = dict(max_steps=4, eval_steps=2, save_steps=2)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run(llama_dir, tmp_path, callbacks=[Interrupt(3)], **changes)
    out, ckpt = tmp_path / "run" / "dpo", tmp_path / "run" / "ckpt"
    assert not out.exists() and not (tmp_path / "run" / "log.parquet").exists()
    assert [step for step, _ in checkpoints(ckpt)] == [2]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left

    summary, table, _ = run(llama_dir, tmp_path, **changes)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert table.loc[table["split"] == "train", "step"].tolist() == [1, 2, 3, 4]  # history kept
    assert json.loads((out / "source.json").read_text())["dpo"]["resumed_from_step"] == 2

    straight, straight_table, _ = run(llama_dir, tmp_path, name="straight", **changes)
    assert straight["resumed_from_step"] == 0
    pd.testing.assert_series_equal(table["loss"], straight_table["loss"], rtol=1e-5)
    # The token count goes on from the checkpoint's instead of starting at 0 again.
    pd.testing.assert_series_equal(table["num_tokens"], straight_table["num_tokens"])
    resumed, uninterrupted = load_prepared(out)[0], load_prepared(tmp_path / "straight" / "dpo")[0]
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_an_unreadable_checkpoint_is_skipped_on_resume(llama_dir, tmp_path):
    changes = dict(max_steps=6, eval_steps=2, save_steps=2)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run(llama_dir, tmp_path, callbacks=[Interrupt(5)], **changes)
    ckpt = tmp_path / "run" / "ckpt"
    assert [step for step, _ in checkpoints(ckpt)] == [2, 4]
    (ckpt / "checkpoint-4" / "trainer_state.json").write_text("")  # a kill during the save
    summary, table, _ = run(llama_dir, tmp_path, **changes)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 6
    straight, straight_table, _ = run(llama_dir, tmp_path, name="straight", **changes)
    pd.testing.assert_series_equal(table["loss"], straight_table["loss"], rtol=1e-5)


def test_checkpoints_of_another_run_are_not_resumed(llama_dir, tmp_path):
    changes = dict(max_steps=4, eval_steps=2, save_steps=2)
    with pytest.raises(RuntimeError):
        run(llama_dir, tmp_path, callbacks=[Interrupt(3)], **changes)
    summary, _, _ = run(llama_dir, tmp_path, **{**changes, "learning_rate": 1e-3})
    assert summary["resumed_from_step"] == 0 and summary["steps"] == 4


def test_early_stopping_keeps_the_best_model(llama_dir, tmp_path):
    summary, table, (out, _, ckpt) = run(
        llama_dir,
        tmp_path,
        pairs=reversed_validation(),
        max_steps=20,
        eval_steps=1,
        save_steps=3,
        early_stopping_patience=2,
        keep_checkpoints=True,
    )
    evals = table[table["split"] == "eval"].set_index("step")["loss"]
    assert evals.is_monotonic_increasing  # the premise: validation only gets worse
    # Best at the first validation, two more without improvement, stop: step 3 of 20.
    assert summary["stopped_early"] and summary["steps"] == 3 < summary["max_steps"]
    assert summary["best_step"] == 1 and summary["best_eval_loss"] == evals[1]
    # Step 1 is no save step (save_steps 3): it was checkpointed because it improved, and
    # the model written is that checkpoint, not the last state.
    written = load_file(out / "model.safetensors")
    best = load_file(ckpt / "checkpoint-1" / "model.safetensors")
    last = load_file(ckpt / "checkpoint-3" / "model.safetensors")
    assert written.keys() == best.keys()
    assert all(torch.equal(written[k], best[k]) for k in written)
    assert not all(torch.equal(written[k], last[k]) for k in written)


def test_failure_leaves_no_output_and_bad_pairs_are_refused(llama_dir, tmp_path):
    with pytest.raises(RuntimeError):
        run(llama_dir, tmp_path, callbacks=[Interrupt(1)], max_steps=3, eval_steps=3, save_steps=3)
    assert not (tmp_path / "run" / "dpo").exists()
    with pytest.raises(DPOError, match="at least 2"):
        run(llama_dir, tmp_path, pairs=PAIRS.head(1))
    with pytest.raises(DPOError, match="rejected"):
        run(llama_dir, tmp_path, pairs=PAIRS.drop(columns="rejected"))


def test_a_run_that_died_after_its_last_step_only_writes_the_outputs(llama_dir, tmp_path):
    changes = dict(max_steps=4, eval_steps=2, save_steps=2)
    first, first_table, (out, log_path, ckpt) = run(
        llama_dir, tmp_path, keep_checkpoints=True, **changes
    )
    out_bytes = (out / "model.safetensors").read_bytes()
    shutil.rmtree(out)
    log_path.unlink()
    again, table, _ = run(llama_dir, tmp_path, **changes)
    assert again["resumed_from_step"] == 4 and again["steps"] == 4
    assert again["best_step"] == first["best_step"]
    assert (out / "model.safetensors").read_bytes() == out_bytes
    pd.testing.assert_frame_equal(table, first_table)
    assert not ckpt.exists()


def test_an_early_stopped_run_is_not_continued(llama_dir, tmp_path):
    changes = dict(
        pairs=reversed_validation(),
        max_steps=20,
        eval_steps=1,
        save_steps=3,
        early_stopping_patience=2,
    )
    first, _, (out, log_path, ckpt) = run(llama_dir, tmp_path, keep_checkpoints=True, **changes)
    assert [s for s, _ in checkpoints(ckpt)] == [1, 3]  # checkpoint-3 was taken as it stopped
    out_bytes = (out / "model.safetensors").read_bytes()
    shutil.rmtree(out)
    again, _, _ = run(llama_dir, tmp_path, **changes)
    assert again["resumed_from_step"] == 3 and again["steps"] == 3 and again["best_step"] == 1
    assert (out / "model.safetensors").read_bytes() == out_bytes


# ---- other alignment methods (dpotox.stages.dpo.methods) ---------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        dict(trainer="dpo", loss_type="ipo"),
        dict(trainer="kto", loss_type="kto"),
        dict(trainer="orpo"),
        dict(trainer="cpo", loss_type="simpo", cpo_alpha=0.0, beta=2.0),
    ],
    ids=["ipo", "kto", "orpo", "simpo"],
)
def test_each_method_trains_and_writes_a_model_the_evaluation_loads(method, llama_dir, tmp_path):
    """Every method goes through the same stage: the seeded split, validation and early
    stopping, the atomic model folder with its training record, and the log."""
    summary, table, (out, _, ckpt) = run(
        llama_dir, tmp_path, max_steps=4, eval_steps=2, save_steps=2, **method
    )
    assert summary["steps"] == 4 and summary["best_step"] in (2, 4)
    # Every method reads the same pairs per step (KTO: a pair's two texts as two examples):
    # 18 training pairs in batches of 4 are 5 steps an epoch.
    assert table.loc[table["split"] == "train", "epoch"].iloc[-1] == pytest.approx(4 / 5)
    evals = table[table["split"] == "eval"]
    assert evals["step"].tolist() == [2, 4] and evals["loss"].notna().all()
    # The margin between chosen and rejected grows on these easy pairs, whatever the loss.
    assert evals["rewards/margins"].iloc[-1] > evals["rewards/margins"].iloc[0]
    model, tok = load_prepared(out)
    meta = json.loads((out / "source.json").read_text())
    assert meta["dpo"]["settings"]["trainer"] == method["trainer"]
    assert meta["dpo"]["settings"]["loss_type"] == method.get("loss_type", "sigmoid")
    base = load_prepared(llama_dir)[0]
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])
    ids = tok("The neighbour said that you are", return_tensors="pt")
    assert (
        model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1]
        == ids["input_ids"].shape[1] + 3
    )
    assert not ckpt.exists()


def test_methods_cut_texts_to_the_budgets_before_their_trainers_tokenise():
    from dpotox.stages.dpo.methods import budget_texts, unpaired

    tok = small_tokenizer()
    pairs = PAIRS.head(2)
    cut = budget_texts(pairs, tok, max_prompt=3, max_completion=2)
    for col, n, keep_end in (("prompt", 3, True), ("chosen", 2, False), ("rejected", 2, False)):
        for full, short in zip(pairs[col], cut[col], strict=True):
            ids = tok(full, add_special_tokens=False)["input_ids"]
            want = ids[-n:] if keep_end else ids[:n]
            assert tok(short, add_special_tokens=False)["input_ids"] == want
    assert budget_texts(pairs, tok, 64, 64).equals(pairs[["prompt", "chosen", "rejected"]])
    u = unpaired(pairs)
    assert u["label"].tolist() == [True, False, True, False]
    assert u["completion"].tolist()[:2] == [pairs["chosen"].iloc[0], pairs["rejected"].iloc[0]]
    # A seed fixes another order of the same examples (KTO reads them in order).
    many = unpaired(PAIRS, seed=1)
    assert many.equals(unpaired(PAIRS, seed=1)) and not many.equals(unpaired(PAIRS, seed=2))
    assert sorted(map(tuple, many.values.tolist())) == sorted(
        map(tuple, unpaired(PAIRS).values.tolist())
    )


def test_a_method_resumes_and_stops_early_as_dpo_does(llama_dir, tmp_path):
    """KTO (unpaired, with a reference) through the interruption and the early stop of DPO's
    tests: the resumed run ends where an uninterrupted one does; validation that only gets
    worse stops the run and keeps the best model."""
    kto = dict(trainer="kto", loss_type="kto", max_steps=4, eval_steps=2, save_steps=2)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run(llama_dir, tmp_path, callbacks=[Interrupt(3)], **kto)
    summary, table, (out, _, _) = run(llama_dir, tmp_path, **kto)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    straight, straight_table, _ = run(llama_dir, tmp_path, name="straight", **kto)
    pd.testing.assert_series_equal(table["loss"], straight_table["loss"], rtol=1e-5)
    stopped, stopped_table, _ = run(
        llama_dir,
        tmp_path,
        name="stopped",
        pairs=reversed_validation(),
        **{**kto, "max_steps": 20, "early_stopping_patience": 1},
    )
    evals = stopped_table[stopped_table["split"] == "eval"]
    assert stopped["stopped_early"] and stopped["steps"] < 20
    assert stopped["best_step"] == int(evals.loc[evals["loss"].idxmin(), "step"])
