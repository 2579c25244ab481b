"""Shared state of the mock SLURM commands in this folder (sbatch, sacct, squeue, ...).

Nothing here talks to a real cluster. Environment variables:

MOCK_SLURM_STATE     folder for job records (default: $TMPDIR/mock_slurm_state)
MOCK_SBATCH_LOG      file that gets one JSON line per sbatch call (default: STATE/sbatch.jsonl)
MOCK_SLURM_ACCOUNTS  comma-separated accounts that `sacctmgr` reports for the user
MOCK_SLURM_ASYNC     "1": sbatch returns at once and runs the job in the background
                     (default: the job runs to its end before sbatch prints the job id)
"""

import fcntl
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

FIRST_JOB_ID = 1000


def state_dir() -> Path:
    d = os.environ.get("MOCK_SLURM_STATE") or os.path.join(
        tempfile.gettempdir(), "mock_slurm_state"
    )
    p = Path(d)
    (p / "jobs").mkdir(parents=True, exist_ok=True)
    return p


def sbatch_log() -> Path:
    return Path(os.environ.get("MOCK_SBATCH_LOG") or state_dir() / "sbatch.jsonl")


@contextmanager
def locked():
    with open(state_dir() / "lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def next_job_id() -> int:
    counter = state_dir() / "counter"
    with locked():
        n = int(counter.read_text()) + 1 if counter.exists() else FIRST_JOB_ID
        counter.write_text(str(n))
    return n


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(), open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def job_file(jobid) -> Path:
    return state_dir() / "jobs" / f"{jobid}.json"


def write_job(job: dict) -> None:
    path = job_file(job["id"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(job))
    os.replace(tmp, path)


def read_job(jobid):
    try:
        return json.loads(job_file(jobid).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def update_job(jobid, **changes) -> None:
    with locked():
        job = read_job(jobid)
        if job is None:
            return
        job.update(changes)
        write_job(job)


def all_jobs() -> list:
    jobs = []
    for path in sorted((state_dir() / "jobs").glob("*.json")):
        try:
            jobs.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            pass
    return jobs


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
