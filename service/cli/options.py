"""The compression options of the command line, generated from `CompressionConfig`: one option per config
field, named after it (`ablations.spbo_mode` -> `--spbo-mode`), with its choices, default and help. Values are
parsed and validated by the config itself (as over HTTP), and an error names the option."""

from __future__ import annotations

import argparse
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from pbs2p.core.config import Ablations, CompressionConfig, ConfigError
from pbs2p.core.errors import Pbs2pError

# extra spellings kept for the options' earlier names
ALIASES = {"skip_modules": ("--skip",)}


@dataclass(frozen=True)
class ConfigOption:
    path: tuple[str, ...]  # where the field sits in the config, e.g. ("ablations", "spbo_mode")
    info: FieldInfo

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        d = self.info.get_default(call_default_factory=True)
        return str(d) if self.name == "pattern" else d


def config_options() -> list[ConfigOption]:
    """Every settable field of the config, top level first (the schema version is not an option)."""
    fields = CompressionConfig.model_fields.items()
    top = [ConfigOption((n,), f) for n, f in fields if n not in ("ablations", "version")]
    return top + [ConfigOption(("ablations", n), f) for n, f in Ablations.model_fields.items()]


def _choices(annotation: Any) -> list[str] | None:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1 and get_origin(args[0]) is Literal:
        return [str(a) for a in get_args(args[0])]
    return None


def _argparse_kwargs(opt: ConfigOption) -> dict[str, Any]:
    """Values stay strings: the config parses and validates them, so an error reads as it does over HTTP."""
    ann = opt.info.annotation
    help_text = f"{opt.info.description} (default: {_shown(opt.default)})"
    kw: dict[str, Any] = {"dest": opt.name, "default": opt.default, "help": help_text}
    choices = _choices(ann)
    if choices is not None:
        return {**kw, "metavar": "{" + ",".join(choices) + "}"}
    if ann is bool:
        return {**kw, "action": argparse.BooleanOptionalAction}
    if get_origin(ann) is tuple:
        if opt.name == "skip_modules":
            return {**kw, "action": "append", "default": None, "metavar": "GLOB"}
        return {**kw, "nargs": "*", "metavar": "N"}
    return {**kw, "metavar": opt.name.upper()}


def _shown(value: Any) -> str:
    if value is None:
        return "see above"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field: the method's options, then the ablations in their own group."""
    main = parser.add_argument_group("compression (CompressionConfig)")
    ablations = parser.add_argument_group("ablations and diagnostics (CompressionConfig.ablations)")
    for opt in config_options():
        group = ablations if opt.path[0] == "ablations" else main
        group.add_argument(opt.flag, *ALIASES.get(opt.name, ()), **_argparse_kwargs(opt))


def config_from_args(args: argparse.Namespace) -> CompressionConfig:
    """The config the parsed options describe; a bad value is a Pbs2pError naming its option."""
    values: dict[str, Any] = {}
    for opt in config_options():
        value = getattr(args, opt.name)
        values[opt.name] = opt.default if value is None and get_origin(opt.info.annotation) is tuple else value
    try:
        return CompressionConfig.from_options(values, strict=False)  # the values are strings
    except ConfigError as exc:
        raise Pbs2pError("; ".join(f"{flag_for(e['field'])}: {e['message']}" for e in exc.errors)) from None


def flag_for(field_path: str) -> str:
    """The option of a config field path: 'ablations.spbo_mode' -> '--spbo-mode', 'skip_modules.0' (an item of
    a list) -> '--skip-modules'."""
    for opt in config_options():
        path = ".".join(opt.path)
        if field_path == path or field_path.startswith(path + "."):
            return opt.flag
    return field_path or "config"
