"""Interrupted runs: a killed writer leaves nothing a glob of ours reads and nothing that stays
forever; an unreadable DPO checkpoint is skipped; reruns with the same seed give the same
Parquet bytes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import duckdb
import torch
from test_evaluate import CFG, inputs  # noqa: F401 (a fixture)
from test_evaluate import run as evaluate_run
from tiny_models import VOCAB, TokenIdTokenizer, tiny_model

from dpotox.engine.arch import Adapter
from dpotox.io import PARTIAL, atomic_dir, atomic_path
from dpotox.stages.activations import cache_generation
from dpotox.stages.dpo.run import _continue_token_count, checkpoints

KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from dpotox.io import atomic_dir
    with atomic_dir(Path(sys.argv[1])) as staging:
        part = staging / "layer=00" / "part-0.parquet"
        part.parent.mkdir()
        part.write_bytes(b"PAR1 half a file")
        print(staging, flush=True)
        time.sleep(60)
""")


def test_a_killed_folder_writer_leaves_nothing_the_caches_glob_reads(tmp_path):
    acts = tmp_path / "activations"
    done = acts / "dpo" / "layer=00"
    done.mkdir(parents=True)
    duckdb.sql("COPY (SELECT 1 AS x) TO '" + str(done / "part-0.parquet") + "' (FORMAT parquet)")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(acts / "base")], stdout=subprocess.PIPE, text=True
    )
    staging = proc.stdout.readline().strip()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert PARTIAL in staging and os.path.isdir(staging)  # what a kill leaves ...
    # ... is not read by the glob of docs/neurons.md and the README
    glob = str(acts) + "/*/layer=*/*.parquet"
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall() == [(1,)]
    # ... and goes when the output is written again.
    with atomic_dir(acts / "base") as new:
        (new / "x").write_text("complete")
    assert not os.path.exists(staging) and not (acts / PARTIAL).exists()
    assert (acts / "base" / "x").read_text() == "complete"


def test_stale_temporary_files_of_an_output_are_removed(tmp_path):
    out = tmp_path / "eval.json"
    stale = tmp_path / ".eval.json.abc123.partial"
    other = tmp_path / ".other.json.abc123.partial"
    stale.write_text("half")
    other.write_text("another output's")
    with atomic_path(out) as tmp:
        tmp.write_text("{}")
    assert out.read_text() == "{}" and not stale.exists() and other.exists()


def _checkpoint(root, step, state):
    ck = root / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(state)
    return ck


def test_an_unreadable_checkpoint_is_skipped_and_logged(tmp_path, caplog):
    good = json.dumps(
        {
            "global_step": 4,
            "max_steps": 10,
            "log_history": [
                {"step": 2, "loss": 0.7, "num_tokens": 100.0},
                {"step": 4, "loss": 0.6, "num_tokens": 210.0},
                {"step": 4, "eval_loss": 0.65},
            ],
        }
    )
    four = _checkpoint(tmp_path, 4, good)
    _checkpoint(tmp_path, 8, "")  # emptied by a kill during the save
    _checkpoint(tmp_path, 6, good[: len(good) // 2])  # cut short
    with caplog.at_level("WARNING", logger="dpotox"):
        assert checkpoints(tmp_path) == [(4, four)]
    assert "checkpoint-8: its trainer_state.json cannot be read" in caplog.text
    assert "checkpoint-6" in caplog.text


def test_a_resumed_run_goes_on_counting_tokens(tmp_path):
    state = {"global_step": 4, "log_history": [{"step": 4, "loss": 0.6, "num_tokens": 210.0}]}
    ck = _checkpoint(tmp_path, 4, json.dumps(state))
    trainer = SimpleNamespace(_total_train_tokens=0)
    _continue_token_count(trainer, ck)
    assert trainer._total_train_tokens == 210


def test_a_rerun_gives_byte_identical_parquet_for_an_evaluation(inputs, tmp_path):  # noqa: F811
    evaluate_run(inputs, tmp_path / "a")
    evaluate_run(inputs, tmp_path / "b")
    a, b = (tmp_path / x / "out" / "base.parquet" for x in "ab")
    assert a.read_bytes() == b.read_bytes()
    # The timings are in the JSON beside it.
    assert json.loads((tmp_path / "a" / "out" / "base.json").read_text())["generation_seconds"] > 0


def test_a_rerun_gives_byte_identical_parquet_for_a_cache(tmp_path):
    model = tiny_model("llama")
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB - 1, (5,), generator=g).tolist() for _ in range(4)]
    for name in ("a", "b"):
        cache_generation(adapter, tok, prompts, list("wxyz"), tmp_path / name, new_tokens=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
