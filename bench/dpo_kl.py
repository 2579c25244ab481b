"""DPO with the papers' full KL against the k3 estimate, on the pairs of a finished run.

    python bench/dpo_kl.py [--run .] [--model smollm2-135m] [--configfile config/config.yaml]

Reads a finished run's prepared base model and preference pairs (``make run`` leaves them in
``resources/models/{model}/base`` and ``results/{model}/dpo/pairs.parquet``), trains DPO twice
under the config's settings, once with ``dpo.kl: full`` and once with ``dpo.kl: k3`` (everything
else equal), evaluates each DPO model as rule ``evaluate`` does (toxicity with its CI, log-PPL,
F1), and prints one row per KL with the training time per optimizer step. The models go to a
temporary folder; nothing of the run is changed. The last line is
``RESULT full=<toxicity> k3=<toxicity> full_s_per_step=<s> k3_s_per_step=<s>``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from dpotox.plan.config import load_config
from dpotox.plan.params import rule_params
from dpotox.stages.dpo import DPOSettings, train_dpo
from dpotox.stages.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=".", help="the folder of a finished run")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configfile", nargs="+", default=[str(REPO / "config" / "config.yaml")])
    args = ap.parse_args()
    run = Path(args.run)
    cfg = load_config(*args.configfile, check_paths=False)
    base = run / "resources" / "models" / args.model / "base"
    pairs = pd.read_parquet(run / "results" / args.model / "dpo" / "pairs.parquet")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dpotox-kl.") as tmp:
        for kl in ("full", "k3"):
            cfg["dpo"]["kl"] = kl
            settings = DPOSettings.from_config(cfg, args.model)
            out = Path(tmp) / kl
            t0 = time.perf_counter()
            summary = train_dpo(
                base,
                pairs,
                out / "model",
                settings,
                checkpoint_dir=out / "checkpoints",
                log_path=out / "train_log.parquet",
                device="cpu",
            )
            seconds = time.perf_counter() - t0
            result = evaluate(
                model_dir=out / "model",
                prompts_path=run / "resources" / "data" / "prompts.parquet",
                wiki_path=run / "resources" / "data" / "wiki.parquet",
                cfg=rule_params(cfg, "evaluate", args.model),
                condition="dpo",
                out_parquet=out / "dpo.parquet",
                out_json=out / "dpo.json",
            )
            rows.append(
                {
                    "kl": kl,
                    "steps": summary["steps"],
                    "best_step": summary["best_step"],
                    "s_per_step": seconds / max(summary["steps"], 1),
                    "toxicity": result["toxicity"],
                    "ci": [result["toxicity_ci_low"], result["toxicity_ci_high"]],
                    "log_ppl": result["log_ppl"],
                    "f1": result["f1"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(pd.DataFrame(rows).to_string(index=False))
    full, k3 = rows
    print(
        f"RESULT full={full['toxicity']:.4f} k3={k3['toxicity']:.4f} "
        f"full_s_per_step={full['s_per_step']:.1f} k3_s_per_step={k3['s_per_step']:.1f}"
    )


if __name__ == "__main__":
    main()
