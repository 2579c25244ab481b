"""Load and validate a dpotox configuration.

The schema (``workflow/schemas/config.schema.yaml``) is the single description of every key:
its type, bounds and default. :func:`validate_config` fills the defaults in place and turns
every violation into one line that names the key, the bad value and what is allowed, so a
bad config stops Snakemake before any job starts. Checks the schema cannot express (a local
path that must exist) run after it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema import Draft202012Validator

from dpotox.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[3]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"

# Source kinds that read a local file or folder; its path must exist when the config is read.
_PATH_KINDS = {"local", "jsonl", "csv", "parquet"}


def load_schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """Read the configuration schema."""
    if not path.is_file():
        raise ConfigError(
            f"config schema not found at {path}; run dpotox from a checkout of the repository"
        )
    with path.open() as fh:
        return yaml.safe_load(fh)


def _extend_with_defaults(validator_class: type) -> type:
    """A validator that writes each property's ``default`` into the instance as it goes.

    Defaults are applied before the properties are checked, so a defaulted object (``{}``)
    is itself descended into and filled.
    """
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if isinstance(subschema, dict) and "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


# JSON Schema counts 1.0 as an integer; a job then fails deep inside with a TypeError.
_STRICT_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, x: isinstance(x, int) and not isinstance(x, bool)
)
_DefaultFillingValidator = jsonschema.validators.extend(
    _extend_with_defaults(Draft202012Validator), type_checker=_STRICT_TYPES
)


def _key(path: Iterable[Any]) -> str:
    parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in path]
    out = ""
    for p in parts:
        out += p if p.startswith("[") or not out else f".{p}"
    return out or "(top level)"


def _allowed(error: jsonschema.ValidationError) -> str:
    v, s = error.validator, error.schema
    if v == "enum":
        return "one of " + ", ".join(repr(x) for x in error.validator_value)
    if v == "const":
        return repr(error.validator_value)
    if v == "type":
        t = error.validator_value
        return "a value of type " + (" or ".join(t) if isinstance(t, list) else t)
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        lo = s.get("minimum", s.get("exclusiveMinimum"))
        hi = s.get("maximum", s.get("exclusiveMaximum"))
        lo_b = "[" if "minimum" in s else "("
        hi_b = "]" if "maximum" in s else ")"
        if lo is not None and hi is not None:
            return f"a number in {lo_b}{lo}, {hi}{hi_b}"
        if lo is not None:
            return f"a number {'>=' if 'minimum' in s else '>'} {lo}"
        return f"a number {'<=' if 'maximum' in s else '<'} {hi}"
    if v == "minItems":
        return f"at least {error.validator_value} item(s)"
    if v == "minProperties":
        return f"at least {error.validator_value} entry"
    if v == "minLength":
        return "a non-empty string"
    if v == "pattern":
        return f"text matching {error.validator_value}"
    return str(error.validator_value)


def _allowed_keys(schema: Mapping[str, Any], instance: Any) -> set[str]:
    """The keys an object may have under ``schema``: its own properties and those of every
    ``if``/``then`` branch whose condition it meets (a source's keys depend on its kind)."""
    allowed = set(schema.get("properties", {}))
    for branch in schema.get("allOf", []):
        cond = branch.get("if")
        if cond is not None and Draft202012Validator(cond).is_valid(instance):
            allowed |= set(branch.get("then", {}).get("properties", {}))
    return allowed


def _describe(error: jsonschema.ValidationError) -> str | None:
    key = _key(error.absolute_path)
    v = error.validator
    if v in ("additionalProperties", "unevaluatedProperties"):
        allowed = sorted(_allowed_keys(error.schema, error.instance))
        extra = (
            sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        )
        if not extra:
            return None  # every key is known: another error says what is wrong with a value
        kind = error.instance.get("kind") if isinstance(error.instance, dict) else None
        where = f"a source of kind {kind!r}" if isinstance(kind, str) else f"'{key}'"
        names = ", ".join(repr(x) for x in extra)
        return f"unknown key {names} under '{key}'; allowed keys of {where}: {', '.join(allowed)}"
    if v == "required":
        return f"'{key}' is missing required key {error.message.split(' is a required')[0]}"
    if v == "not" and "description" in error.schema:
        return (
            f"config key '{key}': {error.instance!r} is not allowed: {error.schema['description']}"
        )
    if v == "propertyNames":
        return f"bad name under '{key}': {error.message}"
    if v == "enum" and error.absolute_path and error.absolute_path[-1] == "family":
        return (
            f"config key '{key}': unknown model family {error.instance!r}; "
            f"supported families: {', '.join(error.validator_value)}"
        )
    if v == "enum" and error.absolute_path and error.absolute_path[-1] == "kind":
        return (
            f"config key '{key}': unknown source kind {error.instance!r}; "
            f"allowed: {', '.join(error.validator_value)}"
        )
    return f"config key '{key}': got {error.instance!r}, expected {_allowed(error)}"


def _leaf_errors(errors: Iterable[jsonschema.ValidationError]) -> list[jsonschema.ValidationError]:
    """Flatten if/then/allOf wrappers to the errors that say what is actually wrong."""
    out: list[jsonschema.ValidationError] = []
    for e in errors:
        if e.context:
            out.extend(_leaf_errors(e.context))
        else:
            out.append(e)
    return out


def validate_config(
    config: dict[str, Any],
    schema: Mapping[str, Any] | None = None,
    *,
    check_paths: bool = True,
    check_relations: bool = True,
) -> dict[str, Any]:
    """Fill defaults into ``config`` (in place) and check it; return it. ``check_relations``
    off skips the checks between keys (:mod:`dpotox.plan.checks`), for a caller that only
    needs the defaults filled in.

    Raises:
        ConfigError: one line per problem, each naming the key, the value and what is allowed.
    """
    schema = load_schema() if schema is None else schema
    if not isinstance(config, dict):
        raise ConfigError(f"the config must be a mapping of keys, got {type(config).__name__}")
    validator = _DefaultFillingValidator(schema)
    errors = _leaf_errors(validator.iter_errors(config))
    # A source with an unknown kind also fails every kind-specific branch, which reports its
    # keys as unknown; the kind error alone says what to fix.
    bad_kind_paths = {
        tuple(e.absolute_path)[:-1]
        for e in errors
        if e.validator == "enum" and e.absolute_path and e.absolute_path[-1] == "kind"
    }
    messages = []
    for e in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path]):
        if e.validator == "unevaluatedProperties" and tuple(e.absolute_path) in bad_kind_paths:
            continue
        msg = _describe(e)
        if msg is not None and msg not in messages:
            messages.append(msg)
    if messages:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(messages))
    _normalise(config)
    from dpotox.plan.checks import relation_problems  # it reads the conditions, which read us

    if check_relations and (problems := relation_problems(config)):
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    if check_paths:
        _check_paths(config)
    return config


def _normalise(config: dict[str, Any]) -> None:
    """Give every data entry one shape: a list of sources."""
    for name, entry in config["data"].items():
        if isinstance(entry, dict):
            config["data"][name] = [entry]


def _iter_sources(config: Mapping[str, Any]):
    for name, model in config["models"].items():
        yield f"models.{name}.source", model["source"]
    for name, entry in config["data"].items():
        for i, src in enumerate(entry or []):
            yield f"data.{name}[{i}]", src


def missing_paths(config: Mapping[str, Any]) -> list[str]:
    """One message per local path in a validated config that does not exist."""
    problems = []
    for key, src in _iter_sources(config):
        if src["kind"] in _PATH_KINDS and not Path(src["path"]).exists():
            problems.append(
                f"config key '{key}.path': {src['path']!r} does not exist (looked in "
                f"{Path.cwd()}); give an existing path, or another source kind"
            )
    ckpt = config["toxicity"]["checkpoint"]
    if ckpt is not None and not Path(ckpt).is_file():
        problems.append(
            f"config key 'toxicity.checkpoint': {ckpt!r} is not a file; give the path of a "
            "Detoxify checkpoint, or null to download it (needs network)"
        )
    tok = config["toxicity"].get("tokenizer")
    if tok is not None and not Path(tok).is_dir():
        problems.append(
            f"config key 'toxicity.tokenizer': {tok!r} is not a folder; give a folder with the "
            "config and tokenizer of Detoxify's base model, or null to download them "
            "(needs network)"
        )
    return problems


def _check_paths(config: Mapping[str, Any]) -> None:
    problems = missing_paths(config)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{self.name}, line {line}: key {key!r} is given twice (first at line "
                    f"{seen[key]}); the second would silently replace the first: merge them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a syntax error, a duplicate key or a file that is not text is
    a :class:`ConfigError` naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a text file (byte {e.start} is not UTF-8); give a YAML config file"
        ) from None
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or "not valid YAML"
        if e.context and e.context_mark and e.context_mark is not mark:
            cm = e.context_mark
            problem += f" ({e.context} at line {cm.line + 1}, column {cm.column + 1})"
        raise ConfigError(f"{path}{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    finally:
        loader.dispose()


def load_config(
    *paths: str | Path, overrides: Mapping[str, Any] | None = None, check_paths: bool = True
) -> dict[str, Any]:
    """Read YAML files (later ones update earlier ones, as Snakemake's --configfile) and
    validate."""
    config: dict[str, Any] = {}
    for p in paths:
        loaded = read_yaml(p) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys at the top level")
        _deep_update(config, loaded)
    if overrides:
        _deep_update(config, copy.deepcopy(dict(overrides)))
    return validate_config(config, check_paths=check_paths)


def _deep_update(base: dict[str, Any], new: Mapping[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def model_setting(config: Mapping[str, Any], model: str, section: str, key: str) -> Any:
    """A per-model override (``models.<model>.<section>.<key>``) or the top-level value."""
    per_model = config["models"][model].get(section, {})
    if isinstance(per_model, Mapping) and key in per_model:
        return per_model[key]
    return config[section][key]


def section_settings(cls: type, config: Mapping[str, Any], *section: str) -> Any:
    """``cls`` (a settings dataclass) from ``config[section[0]][...]``, and the top-level ``seed``
    if ``cls`` has a ``seed`` field; keys the dataclass does not hold are left to other readers."""
    values: Mapping[str, Any] = config
    for key in section:
        values = values.get(key, {})
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in names}
    if "seed" in names:
        kwargs["seed"] = config.get("seed", 0)
    return cls(**kwargs)
