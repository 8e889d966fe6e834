"""A job of a hub model (workers/job.py with workers/hub.py) against the loopback hub: the `downloading` stage,
provenance in the job's summary and the artifact's manifest, the same artifact bytes for the same id + revision +
config; and the real packaged SmolLM2 served by the hub, resumed after a connection broken inside its weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pbs2p.core.format import MANIFEST_FILE
from pbs2p.core.format.manifest import file_sha256
from pbs2p.testing.artifacts import file_hashes
from pbs2p.testing.hub import LocalHub, model_files, serve_hub
from pbs2p.testing.tiny import make_model, save_tokenizer, tiny_job_config, write_text
from pbs2p.workers.job import JobSpec, run_job
from pbs2p.workers.model_refs import fetch_model
from pbs2p.workers.settings import WorkerSettings


@pytest.fixture
def hub() -> Iterator[LocalHub]:
    with serve_hub() as h:
        yield h


def test_hub_job_records_its_source_and_repeats_byte_for_byte(hub: LocalHub, tmp_path: Path, one_thread: None) -> None:
    model = tmp_path / "tiny"
    make_model(model)
    save_tokenizer(model)
    first = {n: Path(p).read_bytes() for n, p in model_files(model).items()}  # served as they are now
    commit = hub.add_commit("org/tiny", first, refs=("main", "v1"))
    make_model(tmp_path / "newer", seed=1)
    hub.add_commit("org/tiny", {**first, **model_files(tmp_path / "newer")})  # main moves on; v1 stays
    cfg = tiny_job_config(calib=str(write_text(tmp_path / "calib.txt")))
    seen: list[tuple[str, int, int]] = []
    results = []
    for i in range(2):  # two services with their own caches
        settings = WorkerSettings(cache_dir=tmp_path / f"cache{i}", hf_endpoint=hub.url)
        progress = (lambda *a: seen.append(a)) if i == 0 else None
        results.append(run_job(JobSpec("org/tiny@v1", cfg), tmp_path / f"out{i}", settings, progress=progress))
    assert file_hashes(tmp_path / "out0") == file_hashes(tmp_path / "out1")
    downloads = [(d, t) for stage, d, t in seen if stage == "downloading"]
    total = sum(len(b) for b in first.values())
    assert downloads[0] == (0, total) and downloads[-1] == (total, total)
    assert [s for s, _, _ in seen].index("downloading") < [s for s, _, _ in seen].index("compress")

    manifest = json.loads((tmp_path / "out0" / MANIFEST_FILE).read_text())
    served = hub.repos["org/tiny"].commits[commit]
    assert manifest["source"] == {
        "model": "org/tiny",
        "commit": commit,
        "files": {n: {"size": f.size, "sha256": f.sha256} for n, f in served.items()},
    }
    summary = results[0].summary()
    assert summary["source"] == {**manifest["source"], "ref": "org/tiny@v1", "revision": "v1"}


def test_local_model_source_is_its_files(tmp_path: Path, one_thread: None) -> None:
    model = tmp_path / "tiny"
    make_model(model)
    save_tokenizer(model)
    cfg = tiny_job_config(calib=str(write_text(tmp_path / "calib.txt")))
    result = run_job(JobSpec(str(model), cfg), tmp_path / "out", WorkerSettings(cache_dir=tmp_path / "c"))
    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(model.iterdir())}
    assert result.source == {"ref": str(model), "files": files}


@pytest.mark.integration
def test_real_model_from_the_hub_resumes_inside_its_weights(hub: LocalHub, real_model: Path, tmp_path: Path) -> None:
    """The packaged SmolLM2-135M (fp32 safetensors, 540 MB) fetched from the loopback hub: the connection drops
    halfway through its weights, huggingface_hub goes on with a Range request, and the files arrive intact."""
    commit = hub.add_commit("HuggingFaceTB/SmolLM2-135M-Instruct", model_files(real_model))
    hub.break_once("HuggingFaceTB/SmolLM2-135M-Instruct", "model.safetensors")
    settings = WorkerSettings(cache_dir=tmp_path, hf_endpoint=hub.url)
    path = fetch_model("HuggingFaceTB/SmolLM2-135M-Instruct", settings)
    assert path.name == commit
    gets = hub.got("GET", "/model.safetensors")
    assert len(gets) == 2 and gets[0].range is None
    assert gets[1].range is not None and int(gets[1].range.removeprefix("bytes=").rstrip("-")) > 0
    for name in model_files(real_model):
        assert file_sha256(path / name) == file_sha256(real_model / name), name
