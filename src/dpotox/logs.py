"""Logging for rule scripts: what a job read, wrote, how long it took, and why it failed."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dpotox.errors import DpotoxError


def _check_prepared_inputs(smk: Any) -> None:
    """Every prepared data table a job reads was made from this config's sources."""
    data = (getattr(smk, "config", None) or {}).get("data") or {}
    # A job started outside Snakemake (python -m dpotox train-dpo) may name no inputs.
    for path in getattr(smk, "input", None) or []:
        p = Path(str(path))
        if p.parent.as_posix().endswith("resources/data") and p.suffix == ".parquet":
            if data.get(p.stem):
                from dpotox.sources.tables import check_prepared

                check_prepared(p, p.stem, data[p.stem])


@contextmanager
def rule_log(smk: Any) -> Iterator[logging.Logger]:
    """Send the ``dpotox`` logger to the rule's log file (and stderr) for one job.

    A :class:`DpotoxError` (bad input the user can fix) is logged as one clear line before it
    propagates, so the log ends with the fix rather than only a stack trace.
    """
    log = logging.getLogger("dpotox")
    log.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if smk.log:
        handlers.append(logging.FileHandler(smk.log[0], mode="w"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    t0 = time.time()
    # The work meter lives with torch, which a job that loads no model (a figure) never imports.
    meter = sys.modules.get("dpotox.engine.flops")
    if meter is not None:
        meter.WORK.reset()
    log.info("rule %s, wildcards %s", smk.rule, dict(smk.wildcards.items()))
    try:
        _check_prepared_inputs(smk)
        yield log
    except DpotoxError as e:
        log.error("%s", e)
        raise
    except Exception:
        log.exception("rule %s failed", smk.rule)
        raise
    else:
        meter = sys.modules.get("dpotox.engine.flops")
        if meter is not None and meter.WORK.tokens:
            # bench/stage_efficiency.py reads this line.
            import torch

            log.info(
                "model work: %d tokens through a model, %d of them trained; %.1f GFLOP "
                "on %d threads",
                meter.WORK.tokens,
                meter.WORK.trained_tokens,
                meter.WORK.flops / 1e9,
                torch.get_num_threads(),
            )
        log.info("done in %.1f s", time.time() - t0)
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
