"""The repository's Snakemake profiles by name: `snakemake --profile local|slurm`.

Snakemake takes ``--profile X`` as a path first; a bare name is looked up as a folder in the
current directory, then in Snakemake's user config folder (``$XDG_CONFIG_HOME/snakemake``, else
``~/.config/snakemake`` on Linux: platformdirs' ``user_config_dir``, which Snakemake itself
asks), then in ``/etc/xdg/snakemake``. :func:`link_profiles` puts a symbolic link to
``profiles/<name>`` of this checkout in the user config folder (``make setup`` runs it), and
:func:`unlink_profiles` removes such links again (``make unlink-profiles``).

What is there already is never replaced, except a link that cannot be anyone's working profile:

* a link to this checkout's profile: kept as it is (re-running is a no-op);
* a dangling link to ``.../profiles/<name>`` (a deleted clone of dpotox): replaced;
* anything else -- the user's own profile folder or file, a link to another clone of dpotox
  (whose account and partitions the user may have edited), a dangling link elsewhere -- is a
  conflict: left untouched, reported with its path and the fix.

    python -m dpotox profiles link   [--repo DIR] [--config-dir DIR] [--warn-only]
    python -m dpotox profiles unlink [--repo DIR] [--config-dir DIR]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dpotox.errors import DpotoxError

PROFILE_NAMES = ("local", "slurm")


class ProfileError(DpotoxError):
    """The folder given as the repository has no profiles, or the config folder is unusable."""


def snakemake_config_dir() -> Path:
    """The folder where Snakemake looks up profile names for this user (its user_config_dir:
    ``$XDG_CONFIG_HOME/snakemake`` or ``~/.config/snakemake`` on Linux), read at each call."""
    try:
        from snakemake.common import get_appdirs

        return Path(get_appdirs().user_config_dir)
    except ImportError:  # the same call Snakemake makes
        from platformdirs import AppDirs

        return Path(AppDirs("snakemake", "snakemake").user_config_dir)


def repo_profiles(repo_root: str | os.PathLike, names=PROFILE_NAMES) -> dict[str, Path]:
    """name -> absolute path of ``profiles/<name>`` of the checkout at repo_root."""
    root = Path(repo_root).resolve()
    profiles = {name: root / "profiles" / name for name in names}
    missing = [
        str(p / "config.yaml") for p in profiles.values() if not (p / "config.yaml").is_file()
    ]
    if missing:
        raise ProfileError(
            f"{root} is not a dpotox checkout: no {', '.join(missing)}. Run this from the "
            "repository root or pass --repo <the repository root>."
        )
    return profiles


def _link_text(path: Path) -> Path:
    """Where the link at path points, as an absolute path (not resolved further)."""
    return Path(os.path.normpath(path.parent / os.readlink(path)))


def _is_link_to(path: Path, target: Path) -> bool:
    if not path.is_symlink():
        return False
    return os.path.realpath(path) == os.path.realpath(target) or _link_text(path) == Path(
        os.path.normpath(target)
    )


def _dpotox_clone(profile_dir: Path) -> Path | None:
    """The checkout a profile folder belongs to, when it is ``<clone>/profiles/<name>`` of a
    clone of dpotox."""
    clone = profile_dir.parent.parent
    if (
        profile_dir.parent.name == "profiles"
        and (clone / "Snakefile").is_file()
        and (clone / "src" / "dpotox").is_dir()
    ):
        return clone
    return None


@dataclass
class LinkResult:
    """What :func:`link_profiles` did: each profile name is in exactly one list."""

    config_dir: Path
    profiles: dict[str, Path]
    linked: list[str] = field(default_factory=list)  # new links
    kept: list[str] = field(default_factory=list)  # already linked here
    replaced: dict[str, Path] = field(default_factory=dict)  # name -> old dangling target
    conflicts: dict[str, str] = field(default_factory=dict)  # name -> what is there, the fix

    @property
    def ok(self) -> bool:
        return not self.conflicts

    def summary(self) -> str:
        """One line: what was linked where."""
        done = []
        if self.linked:
            done.append("linked " + ", ".join(self.linked))
        if self.replaced:
            done.append("linked " + ", ".join(self.replaced) + " (replacing a dangling link)")
        if self.kept:
            done.append(", ".join(self.kept) + " already linked")
        if self.conflicts:
            done.append(", ".join(self.conflicts) + " NOT linked (see the next line)")
        repo = next(iter(self.profiles.values())).parent
        return (
            f"Snakemake profiles by name: {'; '.join(done)} "
            f"({self.config_dir}/<name> -> {repo}/<name>; undo: make unlink-profiles)"
        )


def _conflict(path: Path, name: str, target: Path) -> str | None:
    """None when path may be (re)linked to target; else why not and what to do."""
    if not os.path.lexists(path):
        return None
    by_path = f"or give the path: `snakemake --profile {target}`"
    if path.is_symlink():
        points_to = _link_text(path)
        if not path.exists():
            if points_to.name == name and points_to.parent.name == "profiles":
                return None  # dangling, left by a deleted clone: nobody's profile
            return (
                f"{path} is a dangling link to {points_to}, not made by dpotox; left "
                f"untouched. Remove it (`rm {path}`) and run `make link-profiles`."
            )
        clone = _dpotox_clone(Path(os.path.realpath(path)))
        if clone is not None:
            return (
                f"{path} is a link to {os.path.realpath(path)}, the profile of another clone "
                f"of dpotox ({clone}); left untouched, so `snakemake --profile {name}` uses "
                f"that clone's profile. To use this one's: `make -C {clone} unlink-profiles` "
                f"(or `rm {path}`), then `make link-profiles` here; {by_path}."
            )
        return (
            f"{path} is a link to {points_to}, not to this repository's profile; left "
            f"untouched, so `snakemake --profile {name}` uses it. To use the repository's "
            f"profile by name, remove the link (`rm {path}`) and run `make link-profiles`; "
            f"{by_path}."
        )
    kind = "folder" if path.is_dir() else "file"
    return (
        f"{path} is your own profile {kind} (not a link to this repository's); left "
        f"untouched, so `snakemake --profile {name}` uses it. To use the repository's profile "
        f"by name, move it away (`mv {path} {path}.mine`) and run `make link-profiles`; "
        f"{by_path}."
    )


def link_profiles(
    repo_root: str | os.PathLike, config_dir: str | os.PathLike | None = None, names=PROFILE_NAMES
) -> LinkResult:
    """Link ``<config_dir>/<name>`` to ``<repo_root>/profiles/<name>`` for every name that is
    free, already linked here, or a dangling link left by a deleted clone; every other entry
    is left untouched and reported in ``conflicts`` (``ok`` is then False)."""
    profiles = repo_profiles(repo_root, names)
    config_dir = Path(config_dir) if config_dir is not None else snakemake_config_dir()
    result = LinkResult(config_dir=config_dir, profiles=profiles)
    try:
        config_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProfileError(f"cannot create Snakemake's profile folder {config_dir}: {e}") from e
    for name, target in profiles.items():
        path = config_dir / name
        if _is_link_to(path, target) and path.exists():
            result.kept.append(name)
            continue
        why = _conflict(path, name, target)
        if why is not None:
            result.conflicts[name] = why
            continue
        try:
            if path.is_symlink():  # dangling, from a deleted clone: replace it atomically
                old = _link_text(path)
                tmp = config_dir / f".{name}.dpotox-{os.getpid()}"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(target, target_is_directory=True)
                os.replace(tmp, path)
                result.replaced[name] = old
            else:
                path.symlink_to(target, target_is_directory=True)
                result.linked.append(name)
        except FileExistsError:  # made meanwhile by someone else
            if _is_link_to(path, target):
                result.kept.append(name)
            else:
                result.conflicts[name] = (
                    _conflict(path, name, target) or f"{path} appeared meanwhile"
                )
        except OSError as e:
            result.conflicts[name] = f"cannot link {path} -> {target}: {e}"
    return result


@dataclass
class UnlinkResult:
    config_dir: Path
    removed: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    others: dict[str, str] = field(default_factory=dict)  # name -> what is there (untouched)

    def summary(self) -> str:
        done = []
        if self.removed:
            done.append(
                f"removed the link{'s' if len(self.removed) > 1 else ''} {', '.join(self.removed)}"
            )
        if self.absent:
            done.append(f"no {', '.join(self.absent)}")
        if self.others:
            done.append(", ".join(f"{n} left as is ({why})" for n, why in self.others.items()))
        return f"Snakemake profiles by name in {self.config_dir}: {'; '.join(done)}"


def unlink_profiles(
    repo_root: str | os.PathLike, config_dir: str | os.PathLike | None = None, names=PROFILE_NAMES
) -> UnlinkResult:
    """Remove ``<config_dir>/<name>`` where it is a link to this checkout's profile; anything
    else there (the user's own profile, a link elsewhere) is left as it is."""
    root = Path(repo_root).resolve()
    config_dir = Path(config_dir) if config_dir is not None else snakemake_config_dir()
    result = UnlinkResult(config_dir=config_dir)
    for name in names:
        path, target = config_dir / name, root / "profiles" / name
        if not os.path.lexists(path):
            result.absent.append(name)
        elif _is_link_to(path, target):
            path.unlink()
            result.removed.append(name)
        elif path.is_symlink():
            result.others[name] = f"a link to {_link_text(path)}"
        else:
            result.others[name] = "not a link: your own profile"
    return result


def main(args) -> int:
    """``dpotox profiles link|unlink`` (args from dpotox.cli)."""
    import sys

    repo = args.repo or os.getcwd()
    if args.action == "unlink":
        print(unlink_profiles(repo, args.config_dir).summary())
        return 0
    try:
        result = link_profiles(repo, args.config_dir)
    except (ProfileError, OSError) as e:
        if not args.warn_only:
            raise
        print(f"warning: Snakemake profiles by name not linked: {e}", file=sys.stderr)
        return 0
    print(result.summary())
    level = "warning" if args.warn_only else "error"
    for why in result.conflicts.values():
        print(f"{level}: {why}", file=sys.stderr)
    if result.conflicts and args.warn_only:
        print(
            "warning: going on (--warn-only); `make link-profiles` stops here instead.",
            file=sys.stderr,
        )
    return 0 if result.ok or args.warn_only else 1
