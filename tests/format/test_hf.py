"""An artifact in plain transformers (`import pbs2p.hf`, then `AutoModelForCausalLM.from_pretrained`): packed
linears, the logits of the project's own loader, a loud failure where the quantizer is not registered, a clear
error for a newer format, dequantize, save_pretrained refused. The main checks run in fresh processes that
import nothing but transformers (and pbs2p.hf where registered). Tiny seeded model, CPU only; the real model
(2 blocks) at the end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import pbs2p.hf
from pbs2p.core.config import CompressionConfig
from pbs2p.core.errors import ArtifactError, Pbs2pError
from pbs2p.core.format import TIMINGS_FILE, PackedLinear, add_transformers_files, load_artifact, verify_artifact
from pbs2p.core.format.manifest import HF_INDEX_FILE, MANIFEST_FILE, QUANT_METHOD, file_sha256
from pbs2p.testing.hub import model_files, serve_hub
from pbs2p.testing.real import first_blocks
from pbs2p.testing.tiny import calib_ids, make_model, save_tokenizer, tiny_job_config
from pbs2p.workers.local import compress_model
from pbs2p.workers.text import calibration_for

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter: loads the artifact in plain transformers in several ways and saves what it saw. argv: artifact,
# input ids (.pt), results (.pt), scratch directory. Imports transformers and torch, and pbs2p.hf (nothing else).
LOAD = r"""
import json, shutil, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
import pbs2p.hf
from pbs2p.core.format import PackedLinear

art, ids, out, tmp = Path(sys.argv[1]), torch.load(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
res = {}

def seen(model):
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    dense_shapes = {tuple(v["shape"]) for v in json.loads((art / "manifest.json").read_text())["linears"].values()}
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return {
        "logits": logits,
        "packed": sorted(packed),
        "resident": sum(m.resident_bytes() for m in packed.values()),
        "dense_weights": sum(tuple(t.shape) in dense_shapes for t in tensors),  # a compressed linear's Ŵ
        "devices": sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]}),
        "dtype": str(model.model.embed_tokens.weight.dtype),
        "quantization_config": model.config.to_dict().get("quantization_config"),
    }

m = AutoModelForCausalLM.from_pretrained(art, torch_dtype=torch.float32, device_map="cpu")
res["fp32"] = seen(m)
try:
    m.save_pretrained(tmp / "saved")
except Exception as exc:
    res["save_error"] = f"{type(exc).__name__}: {exc}"
res["saved_files"] = sorted(p.name for p in (tmp / "saved").iterdir()) if (tmp / "saved").exists() else []
dense = m.dequantize()
res["dequantized"] = seen(dense)
dense.save_pretrained(tmp / "dense")
res["bf16"] = seen(AutoModelForCausalLM.from_pretrained(art, dtype=torch.bfloat16, device_map="auto"))
for what in ("config", "manifest"):
    newer = tmp / f"newer-{what}"
    shutil.copytree(art, newer)
    f = newer / ("config.json" if what == "config" else "manifest.json")
    data = json.loads(f.read_text())
    (data["quantization_config"] if what == "config" else data)["format_version"] = 2 if what == "config" else 3
    f.write_text(json.dumps(data))
    try:
        AutoModelForCausalLM.from_pretrained(newer)
    except Exception as exc:
        res[f"newer_{what}"] = f"{type(exc).__name__}: {exc}"
torch.save(res, out)
"""

# A fresh interpreter where pbs2p is not registered: only transformers. argv: artifact.
UNREGISTERED = r"""
import sys
from transformers import AutoModelForCausalLM
try:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
except OSError as exc:
    print("REFUSED:", exc)
    sys.exit(3)
print("LOADED", type(model).__name__)
"""


# A fresh interpreter: from_pretrained of hub ids (HF_ENDPOINT: pbs2p.testing.hub's server). argv: ids (.pt), results
# (.pt), repo ids.
HUB = r"""
import sys
import torch
from transformers import AutoModelForCausalLM
import pbs2p.hf

ids, out, res = torch.load(sys.argv[1]), sys.argv[2], {}
for repo in sys.argv[3:]:
    try:
        model = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32)
        with torch.no_grad():
            res[repo] = model(input_ids=ids, use_cache=False).logits
    except Exception as exc:
        res[repo] = f"{type(exc).__name__}: {exc}"
torch.save(res, out)
"""


def fresh(code: str, *args: Any, **env_vars: str) -> subprocess.CompletedProcess[str]:
    """`code` in a new interpreter that sees the installed packages and this checkout of pbs2p (as an editable
    install does), nothing imported beforehand, one thread, offline unless `env_vars` say otherwise."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        **env_vars,
    }
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True, timeout=600
    )


@dataclass
class Tiny:
    out: Path
    ids: torch.Tensor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("hf")
    make_model(root / "src")
    save_tokenizer(root / "src")
    compress_model(root / "src", root / "out", tiny_job_config(), calib_ids())
    return Tiny(root / "out", calib_ids()[:2])


@torch.no_grad()
def reference(out: Path, mode: str, dtype: torch.dtype, ids: torch.Tensor) -> torch.Tensor:
    """The project's own loader's logits."""
    return load_artifact(out, mode=mode, dtype=dtype)(input_ids=ids, use_cache=False).logits


def test_the_artifact_carries_what_transformers_needs(tiny: Tiny) -> None:
    config = json.loads((tiny.out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": QUANT_METHOD,
        "format": "pbs2p-artifact",
        "format_version": 1,
        "weights": HF_INDEX_FILE,
    }
    index = json.loads((tiny.out / HF_INDEX_FILE).read_text())
    man = verify_artifact(tiny.out).manifest
    assert index["weight_map"] == {k: t["file"] for k, t in man["tensors"].items()}
    shards = set(index["weight_map"].values())
    headers = sum(8 + int.from_bytes((tiny.out / f).read_bytes()[:8], "little") for f in shards)
    assert index["metadata"]["total_size"] == sum((tiny.out / f).stat().st_size for f in shards) - headers  # data
    assert {HF_INDEX_FILE, "config.json"} <= set(man["files"])  # hashed like every file
    assert not list(tiny.out.glob("model*.safetensors*"))  # nothing transformers finds without the quantizer


def test_from_pretrained_in_a_fresh_process(tiny: Tiny, tmp_path: Path) -> None:
    torch.save(tiny.ids, tmp_path / "ids.pt")
    run = fresh(LOAD, tiny.out, tmp_path / "ids.pt", tmp_path / "res.pt", tmp_path)
    assert run.returncode == 0, run.stderr
    res = torch.load(tmp_path / "res.pt")
    man = verify_artifact(tiny.out).manifest
    linears = sorted(n.removesuffix(".weight") for n in man["linears"])
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        got = res[key]
        assert got["packed"] == linears and got["dense_weights"] == 0, key  # every compressed linear stays packed
        assert got["resident"] == man["totals"]["bytes"], key  # resident: the packed bytes, nothing more
        assert got["dtype"] == str(dtype) and got["devices"] == ["cpu"], key
        assert got["quantization_config"]["quant_method"] == QUANT_METHOD
        assert torch.equal(got["logits"], reference(tiny.out, "packed", dtype, tiny.ids)), key
    # dequantize: the dense model of the project's dense loader; save_pretrained of it is a plain checkpoint
    deq = res["dequantized"]
    assert deq["packed"] == [] and deq["dense_weights"] == len(linears) and deq["quantization_config"] is None
    assert torch.equal(deq["logits"], reference(tiny.out, "dense", torch.float32, tiny.ids))
    dense_dir = tmp_path / "dense"
    assert "quantization_config" not in json.loads((dense_dir / "config.json").read_text())
    assert "transformers_weights" not in json.loads((dense_dir / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(input_ids=tiny.ids, use_cache=False).logits, deq["logits"])
    # the packed model refuses save_pretrained, before writing anything
    assert "Pbs2pError" in res["save_error"] and "model.dequantize()" in res["save_error"]
    assert res["saved_files"] == []
    # a newer format: a clear error, from config.json's quantization_config or from the manifest
    assert "format version 2, written by a newer pbs2p" in res["newer_config"], res["newer_config"]
    assert "ArtifactError" in res["newer_manifest"] and "written by a newer pbs2p" in res["newer_manifest"]
    assert "manifest.json" in res["newer_manifest"]


def test_without_the_quantizer_transformers_refuses_loudly(tiny: Tiny) -> None:
    """transformers skips an unknown quant_method with a warning and would build the model with random weights
    from whatever checkpoint it finds: it finds none (no model.safetensors*), so it raises."""
    run = fresh(UNREGISTERED, tiny.out)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "REFUSED:" in run.stdout and "model.safetensors" in run.stdout
    assert "Unknown quantization type, got pbs2p" in run.stderr


def rehash(out: Path) -> None:
    """The manifest's file table after an edit: config.json hashed again, files that are gone dropped."""
    man = json.loads((out / MANIFEST_FILE).read_text())
    man["files"] = {f: v for f, v in man["files"].items() if (out / f).is_file()}
    man["files"]["config.json"] = {
        "size": (out / "config.json").stat().st_size,
        "sha256": file_sha256(out / "config.json"),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(man))


def test_from_a_hub(tiny: Tiny, tmp_path: Path) -> None:
    """A hub id: transformers fetches config.json, the index and the tensor files; the quantizer fetches the
    manifest and the rest at the same commit, verifies, loads packed. A repo without the manifest is refused."""
    files = model_files(tiny.out)
    with serve_hub() as hub:
        hub.add_commit("org/art", files)
        hub.add_commit("org/no-manifest", {k: v for k, v in files.items() if k != MANIFEST_FILE})
        torch.save(tiny.ids, tmp_path / "ids.pt")
        run = fresh(
            HUB, tmp_path / "ids.pt", tmp_path / "res.pt", "org/art", "org/no-manifest",
            HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1",
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert hub.got("GET", f"/{MANIFEST_FILE}")
    res = torch.load(tmp_path / "res.pt")
    assert isinstance(res["org/art"], torch.Tensor), res["org/art"]
    assert torch.equal(res["org/art"], reference(tiny.out, "packed", torch.float32, tiny.ids))
    assert "ArtifactError" in res["org/no-manifest"] and "download it" in res["org/no-manifest"]


def test_a_damaged_artifact_is_refused(tiny: Tiny, tmp_path: Path) -> None:
    out = tmp_path / "art"
    shutil.copytree(tiny.out, out)
    p = out / "pbs2p-block-00001-000.safetensors"
    data = bytearray(p.read_bytes())
    data[-50] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="pbs2p-block-00001-000.safetensors fails its sha256 check"):
        AutoModelForCausalLM.from_pretrained(out)


def test_an_artifact_for_another_model_is_refused(tiny: Tiny, tmp_path: Path) -> None:
    """The config says 256 intermediate units, the tensors were made for 128: refused before anything loads."""
    out = tmp_path / "art"
    shutil.copytree(tiny.out, out)
    config = json.loads((out / "config.json").read_text())
    config["intermediate_size"] = 256
    (out / "config.json").write_text(json.dumps(config))
    rehash(out)
    with pytest.raises(ArtifactError, match=r"compressed linear 'model.layers.0.mlp.down_proj.weight' of shape"):
        AutoModelForCausalLM.from_pretrained(out)


def test_an_older_artifact_loads_with_the_projects_loader_and_after_its_fix_up(tiny: Tiny, tmp_path: Path) -> None:
    """An artifact written before pbs2p.hf (no quantization_config, no index): the project's loader reads it; in
    transformers, even with pbs2p.hf imported, it is no model (no weights transformers knows) until
    `add_transformers_files` gives it what a fresh compression writes."""
    out = tmp_path / "old"
    shutil.copytree(tiny.out, out)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    (out / HF_INDEX_FILE).unlink()
    rehash(out)
    assert torch.equal(
        reference(out, "packed", torch.float32, tiny.ids), reference(tiny.out, "packed", torch.float32, tiny.ids)
    )
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(out)
    # the fix-up: what a fresh compression writes, byte for byte; then from_pretrained reads it
    add_transformers_files(out)
    for f in tiny.out.iterdir():
        if f.name != TIMINGS_FILE:
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny.out.iterdir())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = model(input_ids=tiny.ids, use_cache=False).logits
    assert torch.equal(got, reference(tiny.out, "packed", torch.float32, tiny.ids))
    add_transformers_files(out)  # a current artifact comes out unchanged
    assert (out / MANIFEST_FILE).read_bytes() == (tiny.out / MANIFEST_FILE).read_bytes()


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_other_families_biases_and_skipped_linears(family: str, tmp_path: Path) -> None:
    """Qwen2's q/k/v have biases (loaded into the packed linears), Gemma 3 has sliding and full attention; a
    linear left uncompressed (`skip_modules`) stays an ordinary nn.Linear with its stored weight."""
    src = make_model(tmp_path / "src", family=family)
    biases = {n: t for n, t in src.named_parameters() if n.endswith(".bias")}
    assert (family == "qwen2") == bool(biases)
    with torch.no_grad():  # transformers initialises biases to zero: give them values that show
        for t in biases.values():
            t.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(t.numel()))
    src.save_pretrained(tmp_path / "src")
    compress_model(tmp_path / "src", tmp_path / "out", tiny_job_config(skip_modules=("*.mlp.down_proj",)), calib_ids())
    ids = calib_ids()[:2]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, device_map="cpu")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, PackedLinear) and isinstance(layer.mlp.up_proj, PackedLinear)
    assert type(layer.mlp.down_proj) is torch.nn.Linear
    loaded = dict(model.named_parameters())
    for name, t in biases.items():
        assert torch.equal(loaded[name], t), name
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(got, reference(tmp_path / "out", "packed", torch.float32, ids))


def test_device_maps(tiny: Tiny, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny.out, dtype=torch.float32, device_map={"": "cpu"})
    assert isinstance(model.model.layers[1].mlp.down_proj, PackedLinear)
    with pytest.raises(Pbs2pError, match="cannot be offloaded to disk"):
        AutoModelForCausalLM.from_pretrained(tiny.out, device_map={"": "disk"}, offload_folder=str(tmp_path / "off"))


def test_pbs2p_does_not_compress_while_loading(tmp_path: Path) -> None:
    make_model(tmp_path / "src")
    with pytest.raises(Pbs2pError, match="pbs2p does not compress while loading"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=pbs2p.hf.Pbs2pConfig())


def test_config_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ArtifactError, match="written by a newer pbs2p"):
        pbs2p.hf.Pbs2pConfig(format_version=99)
    with pytest.raises(ArtifactError, match="a positive integer"):
        pbs2p.hf.Pbs2pConfig(format_version="1")
    with pytest.raises(ArtifactError, match="not 'pbs2p-artifact'"):
        pbs2p.hf.Pbs2pConfig(format="other")
    with pytest.raises(ArtifactError, match="weight index"):
        pbs2p.hf.Pbs2pConfig(weights="../x.safetensors.index.json")
    assert pbs2p.hf.Pbs2pConfig(later_field=1).to_dict() == pbs2p.hf.Pbs2pConfig().to_dict()
    pbs2p.hf.register()  # a second registration is a no-op


@pytest.mark.integration
def test_real_model_first_blocks_in_a_fresh_process(real_model: Path, tmp_path: Path) -> None:
    """SmolLM2 cut to its first 2 blocks, compressed on real text: transformers' packed model gives the project
    loader's logits in fp32 and bf16, its compressed linears hold the packed bytes only."""
    src = first_blocks(real_model, tmp_path / "src", 2)
    cfg = CompressionConfig.from_options({"calib_samples": 4, "seqlen": 64, "batch_size": 2})
    compress_model(src, tmp_path / "art", cfg, calibration_for(src, cfg))
    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    run = fresh(LOAD, tmp_path / "art", tmp_path / "ids.pt", tmp_path / "res.pt", tmp_path)
    assert run.returncode == 0, run.stderr
    res = torch.load(tmp_path / "res.pt")
    man = verify_artifact(tmp_path / "art").manifest
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        assert len(res[key]["packed"]) == len(man["linears"]) == 14 and res[key]["dense_weights"] == 0
        assert res[key]["resident"] == man["totals"]["bytes"]
        assert torch.equal(res[key]["logits"], reference(tmp_path / "art", "packed", dtype, ids)), key
    fp16 = sum(2 * v["weights"] for v in man["linears"].values())
    assert res["fp32"]["resident"] < 0.15 * fp16
    assert torch.equal(res["dequantized"]["logits"], reference(tmp_path / "art", "dense", torch.float32, ids))
