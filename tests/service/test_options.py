"""One source of truth for job options: every CompressionConfig field is settable from the command line and over
HTTP under the same name, with the same default, and a bad value gets the same error at the same field."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

import httpx
import pytest

from pbs2p.core.config import Ablations, CompressionConfig
from pbs2p.core.errors import Pbs2pError
from pbs2p.service.cli import commands
from pbs2p.service.cli.options import ConfigOption, config_from_args, config_options
from pbs2p.testing.servers import Service, running_service

OPTIONS = config_options()
# values the generic rules below cannot derive: (a valid non-default value, an invalid one)
SPECIAL: dict[str, tuple[Any, Any]] = {
    "pattern": ("4:8", "9:8"),
    "block_size": (256, 100),
    "device": ("cuda:1", "tpu"),
    "calib": ("wiki-copy.txt", ""),
    "skip_modules": (["*.down_proj"], [""]),
    "salient_search": ([4, 8], [4, 99]),
    "spbo_steps": (2, 7),
    "salient_columns": (8, 80),
    "gptq_bits": (3, 5),
    "block_tune_steps": (0, 100001),  # default None: the method's own (24 for pbs2p)
}


def _literal(ann: Any) -> tuple[str, ...] | None:
    if get_origin(ann) is Literal:
        return get_args(ann)
    if get_origin(ann) in (Union, types.UnionType):
        for a in get_args(ann):
            if get_origin(a) is Literal:
                return get_args(a)
    return None


def values(opt: ConfigOption) -> tuple[Any, Any]:
    """(valid non-default value, invalid value) of a field; invalid is None where the CLI cannot express one."""
    if opt.name in SPECIAL:
        return SPECIAL[opt.name]
    ann, default = opt.info.annotation, opt.default
    choices = _literal(ann)
    if choices is not None:
        return next(c for c in choices if c != default), "bogus"
    if ann is bool:
        return not default, None
    bounds = {type(m).__name__: m for m in opt.info.metadata}
    if ann is float:
        return default * 2, float(bounds["Gt"].gt) if "Gt" in bounds else -1.0
    le = bounds["Le"].le
    return default + 1, le + 1


def test_every_field_has_an_option_and_values() -> None:
    """The CLI's options are exactly the config's fields (its schema version aside), named after them."""
    names = {o.name for o in OPTIONS}
    assert names == (set(CompressionConfig.model_fields) - {"ablations", "version"}) | set(Ablations.model_fields)
    for opt in OPTIONS:
        assert opt.flag == "--" + opt.name.replace("_", "-")
        valid, _ = values(opt)
        assert valid != opt.default, opt.name


def cli_args(opt: ConfigOption, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [opt.flag if value else "--no-" + opt.flag[2:]]
    if isinstance(value, list):
        if opt.name == "skip_modules":
            return [a for v in value for a in (opt.flag, str(v))]
        return [opt.flag, *map(str, value)]
    return [opt.flag, str(value)]


def parse(*argv: str) -> CompressionConfig:
    return config_from_args(commands.build_parser().parse_args(["compress", "m", "-o", "o", *argv]))


def field_of(cfg: CompressionConfig, opt: ConfigOption) -> Any:
    value = cfg.to_dict()
    for part in opt.path:
        value = value[part]
    return value


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("roots")
    (root / "wiki-copy.txt").write_text("some text\n")
    with running_service(tmp_path_factory.mktemp("svc"), root) as s:
        yield s


def body_config(opt: ConfigOption, value: Any) -> dict[str, Any]:
    return {"ablations": {opt.name: value}} if opt.path[0] == "ablations" else {opt.name: value}


@pytest.mark.parametrize("opt", OPTIONS, ids=[o.name for o in OPTIONS])
def test_same_name_default_and_error_on_the_cli_and_over_http(svc: Service, opt: ConfigOption) -> None:
    headers = svc.key("acme")
    schema = httpx.get(f"{svc.url}/openapi.json").json()["components"]["schemas"]
    section = "Ablations" if opt.path[0] == "ablations" else "CompressionConfig"
    prop = schema[section]["properties"][opt.name]
    default = list(opt.default) if isinstance(opt.default, tuple) else opt.default
    # the same default: the CLI's, the HTTP schema's and the config's
    ns = commands.build_parser().parse_args(["compress", "m", "-o", "o"])
    assert getattr(ns, opt.name) in (opt.default, None) and prop.get("default") == default, prop
    assert parse() == CompressionConfig()
    assert prop.get("description") == opt.info.description

    valid, invalid = values(opt)
    if opt.name == "calib":
        valid = str(svc.root / valid)
    assert field_of(parse(*cli_args(opt, valid)), opt) == valid
    r = httpx.post(
        f"{svc.url}/v1/jobs", json={"model": "smollm2-135m", "config": body_config(opt, valid)}, headers=headers
    )
    assert r.status_code == 201, r.text
    assert field_of(CompressionConfig.from_dict(r.json()["config"]), opt) == valid

    if invalid is None:
        return  # a boolean switch has no bad value on the command line
    with pytest.raises(Pbs2pError) as info:
        parse(*cli_args(opt, invalid))
    cli_flag, _, cli_message = str(info.value).partition(": ")
    r = httpx.post(
        f"{svc.url}/v1/jobs", json={"model": "smollm2-135m", "config": body_config(opt, invalid)}, headers=headers
    )
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert [e["field"] for e in errors] == ["config." + ".".join(opt.path) + _item(opt, errors)]
    assert cli_flag == opt.flag and cli_message == errors[0]["message"]


def _item(opt: ConfigOption, errors: list[dict[str, str]]) -> str:
    """An error about one item of a list field is at that item's index (config.skip_modules.0)."""
    field = errors[0]["field"]
    return field[len("config." + ".".join(opt.path)) :] if get_origin(opt.info.annotation) is tuple else ""
