"""Models fetched from a hub (workers/hub.py) with the real huggingface_hub client, against the hub-compatible
server of pbs2p_testing/hub.py on 127.0.0.1: revisions, one download per commit, resume, refusals, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pbs2p.core.errors import Pbs2pError
from pbs2p.core.format.manifest import SOURCE_FILE, file_sha256
from pbs2p.testing.hub import LocalHub, model_files, serve_hub
from pbs2p.testing.tiny import make_model, save_tokenizer
from pbs2p.workers.hub import HubRef, cached_hub_model, fetch_hub_model, inspect_hub_model, parse_hub_ref
from pbs2p.workers.model_refs import check_model_ref, fetch_model, model_kind, with_revision
from pbs2p.workers.settings import WorkerSettings

REPO = "org/tiny"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    make_model(path)
    save_tokenizer(path)
    return path


@pytest.fixture
def hub() -> Iterator[LocalHub]:
    with serve_hub() as h:
        yield h


def settings_for(hub: LocalHub, cache: Path, **kw: object) -> WorkerSettings:
    return WorkerSettings(cache_dir=cache, hf_endpoint=hub.url, **kw)  # type: ignore[arg-type]


def leftovers(settings: WorkerSettings) -> list[str]:
    """What the cache holds besides lock files and empty folders."""
    root = settings.hub_dir
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_hub_ref_spelling() -> None:
    assert parse_hub_ref("org/name") == HubRef("org/name", None)
    assert parse_hub_ref("org/name@v1.0") == HubRef("org/name", "v1.0")
    assert parse_hub_ref("org/name@refs/pr/3") == HubRef("org/name", "refs/pr/3")
    for bad in ("org/name@", "org/name@../x", "org", "org/na me", "/abs/path", "org/name@a b"):
        assert parse_hub_ref(bad) is None, bad
    assert model_kind("org/name@main", roots=[]) == "hub"
    assert with_revision("org/name", "v1") == "org/name@v1"
    assert with_revision(" org/name@v1 ", "v1") == "org/name@v1"
    assert with_revision("org/name", None) == "org/name"
    with pytest.raises(Pbs2pError, match="give one"):
        with_revision("org/name@v1", "v2")
    with pytest.raises(Pbs2pError, match="Hugging Face ids"):
        with_revision("smollm2-135m", "v1")
    with pytest.raises(Pbs2pError, match="not a branch, tag or commit"):
        with_revision("org/name", "a b")


def test_revision_resolved_to_commit_and_fetched_once(hub: LocalHub, tiny_dir: Path, tmp_path: Path) -> None:
    """`@v1` and the default branch resolve to their commits; each commit is downloaded once, only the model's
    files at the top of the repo (no pickle, no code, no sub-folders); the directory records the commit and the
    sha256 of each file, as the hub gave them."""
    files = model_files(tiny_dir)
    extra: dict[str, bytes | Path] = {
        "pytorch_model.bin": b"\x80\x04 pickle that must never be fetched",
        "modeling_tiny.py": b"raise SystemExit('code from a repo must never run')",
        "README.md": b"# tiny",
        "onnx/model.safetensors": b"not for transformers",
    }
    old = hub.add_commit(REPO, {**files, **extra}, refs=("main", "v1"))
    newer = dict(files, **{"generation_config.json": b'{"do_sample": false}'})
    new = hub.add_commit(REPO, newer)
    settings = settings_for(hub, tmp_path)

    path_v1 = fetch_model(f"{REPO}@v1", settings)
    assert path_v1 == settings.hub_dir / "org--tiny" / old
    assert sorted(p.name for p in path_v1.iterdir()) == sorted([*files, SOURCE_FILE])
    for name in extra:
        assert not hub.got("GET", f"/{name}") and not hub.got("HEAD", f"/{name}"), name
    source = json.loads((path_v1 / SOURCE_FILE).read_text())
    assert source["model"] == REPO and source["commit"] == old
    assert source["files"] == {n: {"size": p.stat().st_size, "sha256": file_sha256(p)} for n, p in files.items()}

    path_main = fetch_model(REPO, settings)
    assert path_main.name == new and (path_main / "generation_config.json").read_bytes() == b'{"do_sample": false}'
    gets = len(hub.got("GET", "/model.safetensors"))
    assert gets == 2  # one per commit
    assert fetch_model(f"{REPO}@{old}", settings) == path_v1
    assert fetch_model(f"{REPO}@main", settings) == path_main
    assert len(hub.got("GET", "/model.safetensors")) == gets  # cached: only metadata was asked for
    assert (settings.hub_dir / "org--tiny" / "refs" / "v1").read_text() == old
    assert not list((settings.hub_dir / "org--tiny").glob(".partial-*"))


def test_concurrent_jobs_share_one_download(hub: LocalHub, tiny_dir: Path, tmp_path: Path) -> None:
    hub.add_commit(REPO, model_files(tiny_dir))
    settings = settings_for(hub, tmp_path)
    results: list[Path] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(fetch_model(REPO, settings))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(results) == 3
    assert len(hub.got("GET", "/model.safetensors")) == 1


def big_weights(path: Path) -> Path:
    """A 24 MB safetensors file: more than huggingface_hub's 10 MB download chunk, so a break inside it resumes."""
    save_file({"extra": torch.arange(6 * 2**20, dtype=torch.float32)}, path)
    return path


def test_connection_broken_mid_file_resumes_with_range(hub: LocalHub, tiny_dir: Path, tmp_path: Path) -> None:
    files: dict[str, bytes | Path] = {**model_files(tiny_dir), "extra.safetensors": big_weights(tmp_path / "x")}
    hub.add_commit(REPO, files)
    hub.break_once(REPO, "extra.safetensors")
    settings = settings_for(hub, tmp_path / "cache")
    seen: list[tuple[int, int]] = []
    path = fetch_model(REPO, settings, progress=lambda done, total: seen.append((done, total)))
    gets = hub.got("GET", "/extra.safetensors")
    assert [g.range for g in gets][0] is None and len(gets) == 2
    assert gets[1].range is not None and gets[1].range.startswith("bytes=") and gets[1].range != "bytes=0-"
    assert file_sha256(path / "extra.safetensors") == file_sha256(tmp_path / "x")
    total = sum(p.stat().st_size for p in map(Path, files.values()))
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))


def test_interrupted_download_goes_on_from_the_finished_files(hub: LocalHub, tiny_dir: Path, tmp_path: Path) -> None:
    """A hub failing mid-download (500) leaves no model in the cache, only the partial download; the next fetch
    completes it without fetching the finished files again."""
    files: dict[str, bytes | Path] = {**model_files(tiny_dir), "extra.safetensors": big_weights(tmp_path / "x")}
    commit = hub.add_commit(REPO, files)
    hub.fail_once(REPO, "extra.safetensors")
    settings = settings_for(hub, tmp_path / "cache")
    with pytest.raises(Pbs2pError, match="answered 500.*try again later"):
        fetch_model(REPO, settings)
    assert cached_hub_model(HubRef(REPO), settings) is None
    partial = settings.hub_dir / "org--tiny" / f".partial-{commit}"
    finished = [n for n in files if (partial / n).is_file()]
    assert "extra.safetensors" not in finished
    before = {n: len(hub.got("GET", f"/{n}")) for n in files}
    path = fetch_model(REPO, settings)
    for n in files:  # (config.json is read once more by the checks before the download)
        again = (n == "config.json") + (n not in finished)
        assert len(hub.got("GET", f"/{n}")) == before[n] + again, n
    assert file_sha256(path / "extra.safetensors") == file_sha256(tmp_path / "x")
    assert not partial.exists()


@pytest.mark.parametrize(
    ("setup", "ref", "token", "match"),
    [
        ("none", "org/missing", None, r"org/missing was not found on .* no HF_TOKEN is set.*set HF_TOKEN"),
        ("public", "org/tiny@v9", None, r"revision 'v9' of Hugging Face model org/tiny does not exist"),
        ("private", "org/tiny", None, r"not found .*private and no HF_TOKEN is set"),
        ("private", "org/tiny", "hf_other", r"refused the token in HF_TOKEN \(401\)"),
        ("gated", "org/tiny", None, r"is gated: accept its conditions on http://127\.0\.0\.1:\d+/org/tiny.*HF_TOKEN"),
        ("gated-other", "org/tiny", "hf_other", r"gated and the token in HF_TOKEN has no access yet; request access"),
    ],
)
def test_hub_refusals_name_cause_and_fix(
    hub: LocalHub, tiny_dir: Path, tmp_path: Path, setup: str, ref: str, token: str | None, match: str
) -> None:
    if setup == "gated-other":
        hub.add_commit(REPO, {"README.md": b"other"}, refs=("x",), readers=("hf_other",))  # a valid token elsewhere
        hub.add_commit("org/gated", model_files(tiny_dir), gated=True)
        ref = "org/gated"
        match = match.replace("org/tiny", "org/gated")
    elif setup != "none":
        readers = ("hf_reader",)
        hub.add_commit(REPO, model_files(tiny_dir), private=setup == "private", gated=setup == "gated", readers=readers)
    settings = settings_for(hub, tmp_path, hf_token=token)
    with pytest.raises(Pbs2pError, match=match) as info:
        fetch_model(ref, settings)
    assert token is None or token not in str(info.value)
    assert not hub.got("GET", "/model.safetensors") and leftovers(settings) == []


def test_private_and_gated_repos_with_a_token(hub: LocalHub, tiny_dir: Path, tmp_path: Path) -> None:
    hub.add_commit("org/private", model_files(tiny_dir), private=True, readers=("hf_reader",))
    hub.add_commit("org/gated", model_files(tiny_dir), gated=True, readers=("hf_reader",))
    settings = settings_for(hub, tmp_path, hf_token="hf_reader")
    for repo in ("org/private", "org/gated"):
        assert (fetch_model(repo, settings) / "model.safetensors").is_file()
    assert all(r.authorized for r in hub.requests)


def test_pickle_only_repo_refused_without_fetching_the_pickle(hub: LocalHub, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    # a pickle that would create `marker` if anything loaded it
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    config = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}).encode()
    hub.add_commit(REPO, {"config.json": config, "pytorch_model.bin": payload})
    settings = settings_for(hub, tmp_path / "cache")
    with pytest.raises(Pbs2pError, match=r"only pickle weights \(pytorch_model\.bin\).*refused.*@refs/pr/N"):
        fetch_model(REPO, settings)
    with pytest.raises(Pbs2pError, match="only pickle weights"):
        check_model_ref(REPO, [], settings)  # the service's check at submit time says the same
    assert not hub.got("GET", "/pytorch_model.bin") and not hub.got("HEAD", "/pytorch_model.bin")
    assert not marker.exists() and leftovers(settings) == []


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"auto_map": {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}}, r"needs its own code.*auto_map"),
        ({"model_type": "gpt2"}, r"model type 'gpt2', which pbs2p does not compress yet; supported: gemma2"),
    ],
)
def test_remote_code_and_unknown_families_refused_before_download(
    hub: LocalHub, tiny_dir: Path, tmp_path: Path, change: dict[str, object], match: str
) -> None:
    files = model_files(tiny_dir)
    config = {**json.loads((tiny_dir / "config.json").read_text()), **change}
    hub.add_commit(REPO, {**files, "config.json": json.dumps(config).encode(), "modeling_tiny.py": b"boom"})
    settings = settings_for(hub, tmp_path)
    with pytest.raises(Pbs2pError, match=match):
        fetch_model(REPO, settings)
    assert not hub.got("GET", "/model.safetensors") and not hub.got("GET", "/modeling_tiny.py")
    assert leftovers(settings) == []


def test_size_limit_checked_from_metadata(hub: LocalHub, tiny_dir: Path, tmp_path: Path) -> None:
    hub.add_commit(REPO, model_files(tiny_dir))
    settings = settings_for(hub, tmp_path, max_model_bytes=100_000)
    with pytest.raises(Pbs2pError, match=r"is 0\.00 GB .*above this service's limit .*PBS2P_MAX_MODEL_BYTES"):
        fetch_model(REPO, settings)
    assert not hub.got("GET", "/model.safetensors") and leftovers(settings) == []
    size = inspect_hub_model(HubRef(REPO), settings_for(hub, tmp_path)).total
    assert size == sum(p.stat().st_size for p in tiny_dir.iterdir() if p.is_file())


def test_offline_mode_uses_only_the_cache(hub: LocalHub, tiny_dir: Path, tmp_path: Path) -> None:
    commit = hub.add_commit(REPO, model_files(tiny_dir), refs=("main", "v1"))
    offline = settings_for(hub, tmp_path, hf_offline=True)
    with pytest.raises(Pbs2pError, match=r"not in pbs2p's model cache .*offline mode is on .*`hf download org/tiny"):
        fetch_model(REPO, offline)
    with pytest.raises(Pbs2pError, match="offline mode is on"):
        check_model_ref(REPO, [], offline)
    assert hub.requests == []
    fetch_model(f"{REPO}@v1", settings_for(hub, tmp_path))
    n = len(hub.requests)
    assert fetch_model(f"{REPO}@v1", offline).name == commit
    assert fetch_model(f"{REPO}@{commit}", offline).name == commit
    assert check_model_ref(f"{REPO}@v1", [], offline) == f"{REPO}@v1"
    with pytest.raises(Pbs2pError, match="offline mode is on"):
        fetch_model(REPO, offline)  # main was never fetched here
    assert len(hub.requests) == n


def test_offline_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 (huggingface_hub's own switch) or PBS2P_HF_OFFLINE=1; HF_ENDPOINT and HF_TOKEN as the
    client reads them; the token is never shown."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    s = WorkerSettings(cache_dir=tmp_path)
    assert s.hf_offline and s.hf_endpoint == "http://127.0.0.1:9"
    assert s.hf_token is not None and s.hf_token.get_secret_value() == "hf_secret_value"
    assert "hf_secret_value" not in repr(s) and "hf_secret_value" not in s.model_dump_json()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("PBS2P_HF_OFFLINE", "true")
    assert WorkerSettings().hf_offline


def test_unreachable_hub_is_no_refusal_at_submit(tmp_path: Path) -> None:
    settings = WorkerSettings(cache_dir=tmp_path, hf_endpoint="http://127.0.0.1:9")  # nothing listens there
    assert check_model_ref(REPO, [], settings) == REPO
    with pytest.raises(Pbs2pError, match=r"cannot reach the hub at http://127\.0\.0\.1:9 .*HF_HUB_OFFLINE=1"):
        fetch_model(REPO, settings)


def test_not_enough_disk_refused_before_download(
    hub: LocalHub, tiny_dir: Path, small_disk: Path, tmp_path: Path
) -> None:
    files: dict[str, bytes | Path] = {**model_files(tiny_dir), "extra.safetensors": big_weights(tmp_path / "x")}
    hub.add_commit(REPO, files)
    settings = settings_for(hub, small_disk, max_model_bytes=2**40)
    shutil.copyfile(tiny_dir / "model.safetensors", small_disk / "filler")
    free = shutil.disk_usage(small_disk).free
    with open(small_disk / "filler", "ab") as fh:
        fh.write(b"\0" * (free - 8 * 2**20))  # 8 MB left: less than the model
    with pytest.raises(Pbs2pError, match=r"needs 0\.03 GB more in .* free; free space there or set PBS2P_CACHE_DIR"):
        fetch_model(REPO, settings)
    assert not hub.got("GET", "/extra.safetensors") and leftovers(settings) == []


@pytest.mark.filterwarnings("ignore:Not enough free disk space")  # huggingface_hub's own warning: it is right
def test_disk_filling_mid_download_leaves_nothing(
    hub: LocalHub, tiny_dir: Path, small_disk: Path, tmp_path: Path
) -> None:
    """Enough room when the download starts; another writer fills the disk while it runs: a clear error, and the
    partial download is removed (it would only hold the space)."""
    files: dict[str, bytes | Path] = {**model_files(tiny_dir), "extra.safetensors": big_weights(tmp_path / "x")}
    hub.add_commit(REPO, files)
    settings = settings_for(hub, small_disk / "cache")

    def fill(done: int, total: int) -> None:
        if done == 0:  # the download is about to start: the disk fills up behind its back
            free = shutil.disk_usage(small_disk).free
            with open(small_disk / "filler", "wb") as fh:
                fh.write(b"\0" * (free - 2**20))

    with pytest.raises(Pbs2pError, match=r"disk of .* filled up while downloading org/tiny .*partial download was"):
        fetch_model(REPO, settings, progress=fill)
    assert leftovers(settings) == [] and not list(settings.hub_dir.rglob(".partial-*"))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 40 MB file system (tmpfs), so that it really fills up; needs root (as CI runs)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_fetch_hub_model_direct_commit_skips_the_ref(hub: LocalHub, tiny_dir: Path, tmp_path: Path) -> None:
    commit = hub.add_commit(REPO, model_files(tiny_dir))
    settings = settings_for(hub, tmp_path)
    path = fetch_hub_model(HubRef(REPO, commit), settings)
    assert path.name == commit and cached_hub_model(HubRef(REPO, commit), settings) == path
    assert hub.got("GET", f"/api/models/{REPO}/revision/{commit}")
