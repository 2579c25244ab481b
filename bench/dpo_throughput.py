"""DPO optimizer steps per second with the reference live beside every step and precomputed.

    python bench/dpo_throughput.py [--run .] [--model smollm2-135m] [--steps 8]
                                   [--configfile config/config.yaml]

Reads a finished run's prepared base model and preference pairs (``make run`` leaves them in
``resources/models/{model}/base`` and ``results/{model}/dpo/pairs.parquet``) and trains
``--steps`` optimizer steps twice under the config's settings (its ``dpo.kl`` included),
``dpo.precompute_ref_log_probs`` false (two forwards per micro-batch: policy and reference)
and true (one reference pass over every pair first, then one forward per micro-batch).
Steps are timed between the ends of the first and the last step, so loading, the reference
pass and the final save are reported apart. Validation runs once, after the last step. The
models go to a temporary folder; nothing of the run is changed. TRL pads each micro-batch to
its longest sequence only (no padding to a multiple), so there is no padding to remove.

The last line is ``RESULT live_steps_per_s=<x> precomputed_steps_per_s=<y> speedup=<y/x>``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import TrainerCallback

from dpotox.plan.config import load_config
from dpotox.stages.dpo import DPOSettings, train_dpo

REPO = Path(__file__).resolve().parents[1]


class _StepClock(TrainerCallback):
    """The wall time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=".", help="the folder of a finished run")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per way (>= 3)")
    ap.add_argument("--configfile", nargs="+", default=[str(REPO / "config" / "config.yaml")])
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be at least 3: the first step is warm-up and not timed")
    run = Path(args.run)
    cfg = load_config(*args.configfile, check_paths=False)
    base = run / "resources" / "models" / args.model / "base"
    pairs = pd.read_parquet(run / "results" / args.model / "dpo" / "pairs.parquet")
    cfg["dpo"].update(max_steps=args.steps, eval_steps=args.steps, save_steps=args.steps)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dpotox-dpo-steps.") as tmp:
        for precompute in (False, True):
            cfg["dpo"]["precompute_ref_log_probs"] = precompute
            settings = DPOSettings.from_config(cfg, args.model)
            out = Path(tmp) / ("precomputed" if precompute else "live")
            clock = _StepClock()
            t0 = time.perf_counter()
            summary = train_dpo(
                base,
                pairs,
                out / "model",
                settings,
                checkpoint_dir=out / "checkpoints",
                log_path=out / "train_log.parquet",
                device="cpu",
                callbacks=[clock],
            )
            total = time.perf_counter() - t0
            timed = clock.ends[-1] - clock.ends[0]
            log = pd.read_parquet(out / "train_log.parquet")
            train = log[log["split"] == "train"]
            rows.append(
                {
                    "reference": "precomputed" if precompute else "live",
                    "kl": settings.kl,
                    "threads": torch.get_num_threads(),
                    "steps": summary["steps"],
                    "s_per_step": timed / (len(clock.ends) - 1),
                    "steps_per_s": (len(clock.ends) - 1) / timed,
                    "total_s": total,
                    "last_loss": float(train["loss"].dropna().iloc[-1]),
                    "last_kl": float(train["kl"].dropna().iloc[-1]),
                    "eval_loss": summary["best_eval_loss"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    live, pre = rows
    print(
        f"RESULT live_steps_per_s={live['steps_per_s']:.3f} "
        f"precomputed_steps_per_s={pre['steps_per_s']:.3f} "
        f"speedup={pre['steps_per_s'] / live['steps_per_s']:.2f}"
    )


if __name__ == "__main__":
    main()
