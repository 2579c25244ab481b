"""dpotox.profiles: the links that make `snakemake --profile local|slurm` work by name
(`make setup` / `make unlink-profiles`). Every test works in a temporary config folder; the
workflow runs through the names are in tests/test_slurm_profile.py."""

import os
import sys
from pathlib import Path

import pytest

from dpotox.cli import main
from dpotox.profiles import (
    PROFILE_NAMES,
    ProfileError,
    link_profiles,
    snakemake_config_dir,
    unlink_profiles,
)

REPO = Path(__file__).resolve().parents[1]
OURS = {name: (REPO / "profiles" / name).resolve() for name in PROFILE_NAMES}


@pytest.fixture
def config_dir(tmp_path) -> Path:
    return tmp_path / "config" / "snakemake"  # made by link_profiles


def other_clone(root: Path) -> Path:
    """Another checkout of dpotox (what _dpotox_clone recognises), with its own profiles."""
    (root / "src" / "dpotox").mkdir(parents=True)
    (root / "Snakefile").write_text("# another clone\n")
    for name in PROFILE_NAMES:
        (root / "profiles" / name).mkdir(parents=True)
        (root / "profiles" / name / "config.yaml").write_text("cores: 1\n")
    return root


def assert_ours(path: Path):
    assert path.is_symlink() and path.resolve() == OURS[path.name]


def test_link_is_idempotent(config_dir):
    first = link_profiles(REPO, config_dir)
    assert first.ok and first.linked == list(PROFILE_NAMES) and not first.kept
    for name in PROFILE_NAMES:
        assert_ours(config_dir / name)
        # absolute, so that the name works from any folder
        assert Path(os.readlink(config_dir / name)).is_absolute()
    second = link_profiles(REPO, config_dir)
    assert second.ok and second.kept == list(PROFILE_NAMES) and not second.linked
    assert "\n" not in second.summary() and "already linked" in second.summary()
    assert sorted(p.name for p in config_dir.iterdir()) == sorted(PROFILE_NAMES)
    # a link the user removed comes back on the next set-up
    (config_dir / "slurm").unlink()
    third = link_profiles(REPO, config_dir)
    assert third.linked == ["slurm"] and third.kept == ["local"]
    assert_ours(config_dir / "slurm")


def test_users_own_profile_is_never_touched(config_dir):
    own = config_dir / "slurm"
    own.mkdir(parents=True)
    (own / "config.yaml").write_text("executor: slurm\n# mine\n")
    result = link_profiles(REPO, config_dir)
    assert not result.ok and list(result.conflicts) == ["slurm"]
    assert str(own) in result.conflicts["slurm"] and "mv " in result.conflicts["slurm"]
    assert result.linked == ["local"]  # the free name is still linked
    assert not own.is_symlink() and (own / "config.yaml").read_text() == "executor: slurm\n# mine\n"
    # a file of that name, or a link to a folder of the user's, likewise
    (config_dir / "local").unlink()
    (config_dir / "local").write_text("cores: 8\n")
    assert "local" in link_profiles(REPO, config_dir).conflicts
    assert (config_dir / "local").read_text() == "cores: 8\n"
    mine = config_dir.parent / "my-profile"
    mine.mkdir()
    (config_dir / "local").unlink()
    (config_dir / "local").symlink_to(mine)
    why = link_profiles(REPO, config_dir).conflicts["local"]
    assert str(config_dir / "local") in why and str(mine) in why
    assert (config_dir / "local").resolve() == mine.resolve()


def test_link_to_another_clone_is_left_and_named(config_dir, tmp_path):
    clone = other_clone(tmp_path / "elsewhere" / "dpotox")
    config_dir.mkdir(parents=True)
    (config_dir / "slurm").symlink_to(clone / "profiles" / "slurm")
    result = link_profiles(REPO, config_dir)
    why = result.conflicts["slurm"]
    assert "another clone" in why and str(clone) in why and "unlink-profiles" in why
    assert (config_dir / "slurm").resolve() == (clone / "profiles" / "slurm").resolve()
    assert result.linked == ["local"]


def test_dangling_link_of_a_deleted_clone_is_replaced(config_dir, tmp_path):
    config_dir.mkdir(parents=True)
    (config_dir / "slurm").symlink_to(tmp_path / "deleted-clone" / "profiles" / "slurm")
    # a dangling link that is no dpotox profile is not ours to replace
    (config_dir / "local").symlink_to(tmp_path / "unmounted" / "my-local")
    result = link_profiles(REPO, config_dir)
    assert list(result.replaced) == ["slurm"]
    assert_ours(config_dir / "slurm")
    assert "dangling" in result.conflicts["local"]
    assert os.readlink(config_dir / "local") == str(tmp_path / "unmounted" / "my-local")


def test_unlink_removes_only_our_links(config_dir, tmp_path):
    link_profiles(REPO, config_dir)
    clone = other_clone(tmp_path / "other")
    (config_dir / "slurm").unlink()
    (config_dir / "slurm").symlink_to(clone / "profiles" / "slurm")
    result = unlink_profiles(REPO, config_dir)
    assert result.removed == ["local"] and list(result.others) == ["slurm"]
    assert not os.path.lexists(config_dir / "local")
    assert (config_dir / "slurm").resolve() == (clone / "profiles" / "slurm").resolve()
    # the user's own folder stays too; nothing left to remove is not an error
    (config_dir / "local").mkdir()
    again = unlink_profiles(REPO, config_dir)
    assert not again.removed and set(again.others) == {"local", "slurm"}
    assert (config_dir / "local").is_dir()


def test_not_a_checkout(tmp_path, config_dir):
    with pytest.raises(ProfileError, match="not a dpotox checkout"):
        link_profiles(tmp_path, config_dir)
    assert not config_dir.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="the XDG layout of Linux")
def test_config_dir_is_snakemakes(tmp_path, monkeypatch):
    """The folder Snakemake looks names up in: $XDG_CONFIG_HOME/snakemake, else
    ~/.config/snakemake (read when called, so a changed HOME counts)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert snakemake_config_dir() == tmp_path / ".config" / "snakemake"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert snakemake_config_dir() == tmp_path / "xdg" / "snakemake"


def test_cli(config_dir, capsys, monkeypatch):
    args = ["--repo", str(REPO), "--config-dir", str(config_dir)]
    assert main(["profiles", "link", *args]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "linked local, slurm" in out and str(config_dir) in out
    (config_dir / "slurm").unlink()
    (config_dir / "slurm").mkdir()
    # a conflict: an error when linking is asked for (make link-profiles, setup, run) ...
    assert main(["profiles", "link", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(config_dir / "slurm") in err
    # ... a warning for make test, which must not fail on it
    assert main(["profiles", "link", *args, "--warn-only"]) == 0
    assert "warning: " in capsys.readouterr().err
    assert main(["profiles", "link", "--repo", str(config_dir), "--warn-only"]) == 0
    assert "not a dpotox checkout" in capsys.readouterr().err
    assert main(["profiles", "link", "--repo", str(config_dir)]) == 2
    assert main(["profiles", "unlink", *args]) == 0
    assert "removed the link local" in capsys.readouterr().out
    assert not os.path.lexists(config_dir / "local") and (config_dir / "slurm").is_dir()
    # default --repo: the current folder (the Makefile passes it anyway)
    monkeypatch.chdir(REPO)
    assert main(["profiles", "link", "--config-dir", str(config_dir), "--warn-only"]) == 0
    assert_ours(config_dir / "local")
