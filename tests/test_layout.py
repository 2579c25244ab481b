"""The package's layout is its architecture: planning code stays light, every module imports."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import dpotox
import dpotox.plan

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "accelerate", "matplotlib")


def test_planning_modules_import_no_torch():
    """Every cluster job parses the Snakefile, which imports only dpotox.plan: importing all of
    it in a fresh interpreter must not load torch, transformers, TRL, accelerate or matplotlib."""
    names = [f"dpotox.plan.{m.name}" for m in pkgutil.iter_modules(dpotox.plan.__path__)]
    assert {"dpotox.plan.config", "dpotox.plan.conditions", "dpotox.plan.outputs"} <= set(names)
    code = (
        f"import sys\nfor n in {names!r}: __import__(n)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"planning modules import {out.stdout.strip()}"


def test_snakefile_and_rules_import_only_planning_modules():
    """What the workflow imports at parse time is dpotox.plan (and the error classes)."""
    sources = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    for path in sources:
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("from", "import") and words[1].startswith("dpotox"):
                assert words[1].startswith(("dpotox.plan", "dpotox.errors")), f"{path.name}: {line}"


def test_every_module_imports():
    """No module is left behind by a move: each imports (heavy ones included)."""
    for m in pkgutil.walk_packages(dpotox.__path__, "dpotox."):
        if m.name != "dpotox.__main__":
            __import__(m.name)


def test_planning_modules_import_nothing_outside_plan():
    """dpotox.plan depends on dpotox.errors and itself only, so it stays light by construction."""
    for path in Path(dpotox.plan.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and node.module.startswith("dpotox")
            ):
                assert node.module.startswith(("dpotox.plan", "dpotox.errors")), (
                    f"{path.name} imports {node.module}"
                )


def test_no_file_names_a_path_the_repository_lacks():
    """Docs, comments and configs name repository paths that exist (outputs under results/,
    resources/, logs/ and benchmarks/ are made by runs, and templates with {...} or * are
    patterns, so neither is checked)."""
    import re

    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    roots = "src|docs|workflow|config|tests|bench|profiles|envs|requirements|\\.ci"
    pattern = re.compile(rf"(?<![\w/.$-])((?:{roots})/[\w./-]*[\w/])")
    missing = []
    for name in tracked:
        path = REPO / name
        if path.suffix in (".svg", ".csv", ".parquet", ".png", ".pdf"):
            continue
        text = path.read_text(errors="replace")
        for m in pattern.finditer(text):
            target = m.group(1)
            if text[m.end() : m.end() + 1] in "{*<" or "profiles/default" in target:
                continue  # a pattern; profiles/default is named to say it must not exist
            if not ((REPO / target).exists() or (path.parent / target).exists()):
                missing.append(f"{name}: {target}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)
