"""The one config (pbs2p_core/config.py): defaults, round trips, version-1 migration, and every bad value
reported at its field's path with what to change."""

from __future__ import annotations

import pytest

from pbs2p.core.config import ABLATION_FIELDS, TUNE_STEPS, Ablations, CompressionConfig, ConfigError, NMPattern


@pytest.mark.parametrize(
    "data,field,match",
    [
        ({"pattern": "8:8"}, "pattern", "use N < M"),
        ({"pattern": "9:8"}, "pattern", "use N < M"),
        ({"pattern": "0:8"}, "pattern", "keeps no weight"),
        ({"pattern": "x"}, "pattern", "is not N:M"),
        ({"pattern": 6}, "pattern", "string N:M"),
        ({"spbo_steps": 3}, "spbo_steps", "between 1 and M - N = 2"),
        ({"spbo_steps": 0}, "spbo_steps", "greater than or equal to 1"),
        ({"method": "nope"}, "method", "'fp', 'arb', 'prune-binarize', 'pbs2p' or 'gptq'"),
        ({"block_size": 100}, "block_size", "multiple of M"),
        ({"salient_columns": 80}, "salient_columns", "at most block_size/2 = 64"),
        ({"device": "tpu"}, "device", "should match pattern"),
        ({"damping": 0}, "damping", "greater than 0"),
        ({"ablations": {"arb_variant": "arb-rc"}}, "ablations.arb_variant", "salient_columns=0"),
        ({"ablations": {"cfs_score": "cos"}}, "ablations.cfs_score", "'cosine' or 'error'"),
        ({"ablations": {"arb_iters": 0}}, "ablations.arb_iters", "greater than or equal to 1"),
        ({"ablations": {"salient_search": [4, 99]}}, "ablations.salient_search", "at most block_size/2"),
        (
            {"ablations": {"salient_search": [4], "salient_allocation": "linear"}},
            "ablations.salient_allocation",
            "use 'block'",
        ),
        ({"mehtod": "arb"}, "mehtod", "unknown field"),
        ({"ablations": {"nope": 1}}, "ablations.nope", "unknown field"),
        ({"spbo_mode": "fixed"}, "spbo_mode", "give it as ablations.spbo_mode"),
        ({"version": 3}, "version", "Input should be 2"),
    ],
)
def test_bad_config_names_the_field_and_the_fix(data: dict, field: str, match: str) -> None:
    with pytest.raises(ConfigError) as info:
        CompressionConfig.from_dict(data)
    assert [e["field"] for e in info.value.errors] == [field]
    assert match in info.value.errors[0]["message"]
    assert str(info.value).startswith(f"{field}: ")


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        CompressionConfig.from_dict({"block_size": 100, "salient_columns": 60, "ablations": {"arb_variant": "arb-rc"}})
    assert sorted(e["field"] for e in info.value.errors) == ["ablations.arb_variant", "block_size", "salient_columns"]


def test_round_trip_and_defaults() -> None:
    cfg = CompressionConfig.from_options(pattern=NMPattern(4, 8), salient_search=(4, 8), skip_modules=("*.down_proj",))
    d = cfg.to_dict()
    assert d["pattern"] == "4:8" and d["ablations"]["salient_search"] == [4, 8] and d["version"] == 2
    assert CompressionConfig.from_dict(d) == cfg
    assert cfg.ablations.salient_allocation == "block"  # resolved: a search picks per block
    assert CompressionConfig().ablations.salient_allocation == "linear"
    assert set(d["ablations"]) == set(ABLATION_FIELDS) == set(Ablations.model_fields)


def test_version_1_configs_are_read_as_version_2() -> None:
    """A flat version-1 dict (what the job store and artifacts held before) reads as the same config."""
    v1 = {"method": "pbs2p", "pattern": "5:8", "spbo_mode": "fixed", "scale_refit": False, "seed": 3, "version": 1}
    cfg = CompressionConfig.from_dict(v1)
    assert cfg.version == 2 and cfg.pattern == NMPattern(5, 8) and cfg.seed == 3
    assert cfg.ablations.spbo_mode == "fixed" and cfg.ablations.scale_refit is False


def test_replace_and_from_options_take_flat_names() -> None:
    cfg = CompressionConfig().replace(method="prune-binarize", spbo_report=True)
    assert cfg.method == "prune-binarize" and cfg.ablations.spbo_report and cfg.tau == 1
    assert CompressionConfig.from_options(spbo_mode="fixed").ablations.spbo_mode == "fixed"
    with pytest.raises(ConfigError, match="spbo_steps"):
        CompressionConfig().replace(spbo_steps=9)


def test_block_tuning_is_on_for_pbs2p_and_off_for_the_baselines() -> None:
    """block_tune_steps None means the method's default: TUNE_STEPS for pbs2p, 0 (the published baselines as
    they are) for arb, prune-binarize and gptq; an explicit value wins, also across replace."""
    assert CompressionConfig().tune_steps == TUNE_STEPS > 0
    assert all(CompressionConfig(method=m).tune_steps == 0 for m in ("arb", "prune-binarize", "gptq"))
    assert CompressionConfig(block_tune_steps=0).tune_steps == 0
    assert CompressionConfig(method="arb", block_tune_steps=5).tune_steps == 5
    assert CompressionConfig().replace(method="arb").tune_steps == 0  # None stays None: arb's default
    with pytest.raises(ConfigError, match="block_tune_steps"):
        CompressionConfig.from_options(block_tune_steps=-1)


def test_configs_are_frozen_and_hashable() -> None:
    cfg = CompressionConfig()
    with pytest.raises(ValueError):
        cfg.seed = 1  # type: ignore[misc]
    assert hash(cfg) == hash(CompressionConfig()) and {cfg: 1}[CompressionConfig()] == 1
