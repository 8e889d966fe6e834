"""Models fetched from a Hugging Face hub (or a mirror, `HF_ENDPOINT`): `org/name[@revision]`.

`inspect_hub_model` asks the hub (model info at the revision, then `config.json`) for the commit the revision
points at and checks, before any weight is fetched, what can be known from metadata: the repo exists and is
readable with the token, it has safetensors weights (pickle is refused), its config needs no remote code and
is a supported family, and its size is within `max_model_bytes`. `fetch_hub_model` then downloads the
checked files with `snapshot_download` into `<cache>/models/hub/<org>--<name>/<commit>/`, once per commit:
concurrent jobs wait on one file lock; the files go to `.partial-<commit>/` (renamed into place once complete
and verified against the hub's sha256 / git blob ids), so nothing half-written looks like a model. A download
that is interrupted keeps its finished files there and goes on from them; a connection broken inside a file
is resumed by huggingface_hub with a Range request. Offline (`HF_HUB_OFFLINE=1` or `PBS2P_HF_OFFLINE=1`),
only models already in this cache are used. The token is passed to huggingface_hub and goes nowhere else.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
from huggingface_hub import HfApi, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from pbs2p.core.errors import Pbs2pError
from pbs2p.core.families import FAMILIES
from pbs2p.core.format.manifest import SOURCE_FILE, file_sha256

from .packaged import file_lock
from .settings import WorkerSettings

log = logging.getLogger(__name__)

DEFAULT_REVISION = "main"  # as huggingface_hub and `hf download`
HUB_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
REVISION = r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}"  # branch, tag, commit or refs/pr/N
HUB_REF = re.compile(rf"^(?P<repo>{HUB_ID})(?:@(?P<rev>{REVISION}))?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# what is fetched: weights in safetensors, config, tokenizer, generation config, chat template; only at the top
# of the repo (as from_pretrained reads it). Never pickle weights, never code.
MODEL_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_TIMEOUT = 30.0  # seconds for one metadata request
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
ProgressBytes = Callable[[int, int], None]  # (bytes done, bytes total)


class HubUnreachable(Pbs2pError):
    """The hub could not be reached or failed (network, 5xx): no verdict on the model."""


@dataclass(frozen=True)
class HubRef:
    """A model on a hub: its repo id and the revision asked for (None: the default branch, 'main')."""

    repo_id: str
    revision: str | None = None

    @property
    def rev(self) -> str:
        return self.revision or DEFAULT_REVISION

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def parse_hub_ref(ref: str) -> HubRef | None:
    """`org/name` or `org/name@revision` as a HubRef; None when `ref` is not spelled like one."""
    m = HUB_REF.match(ref)
    if m is None or ".." in (m["rev"] or ""):
        return None
    return HubRef(m["repo"], m["rev"])


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files: the sha256 of the content
    blob_id: str | None  # other files: the git blob id (sha1 of "blob <size>\0" + content)


@dataclass(frozen=True)
class HubModel:
    """A checked model at a resolved commit: the files to fetch."""

    ref: HubRef
    commit: str
    files: tuple[HubFile, ...]

    @property
    def total(self) -> int:
        return sum(f.size or 0 for f in self.files)


def _api(settings: WorkerSettings) -> HfApi:
    return HfApi(endpoint=settings.hf_endpoint, token=_token(settings), library_name="pbs2p")


def _token(settings: WorkerSettings) -> str | None:
    return settings.hf_token.get_secret_value() if settings.hf_token is not None else None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def inspect_hub_model(ref: HubRef, settings: WorkerSettings) -> HubModel:
    """Resolve `ref` to a commit and check that its model can be fetched and compressed (see the module doc)."""
    if settings.hf_offline:
        raise _offline_error(ref, settings)
    try:
        info = _api(settings).model_info(ref.repo_id, revision=ref.rev, files_metadata=True, timeout=_TIMEOUT)
        if not info.sha or not COMMIT.match(info.sha):
            raise Pbs2pError(f"the hub at {settings.hf_endpoint} gave no commit for {ref}; is it a Hugging Face hub?")
        names = {s.rfilename: s for s in info.siblings or []}
        top = [n for n in names if "/" not in n]
        pickles = sorted(n for n in top if n.endswith(PICKLE_SUFFIXES))
        wanted = [n for n in sorted(top) if any(fnmatch.fnmatch(n, p) for p in MODEL_PATTERNS)]
        if not any(n.endswith(".safetensors") for n in wanted):
            if pickles:
                raise Pbs2pError(
                    f"Hugging Face model {ref} has only pickle weights ({', '.join(pickles[:3])}); pickle checkpoints "
                    f"are refused (loading one can run code): use a revision with *.safetensors (the hub's "
                    f"conversion bot often has one as {ref.repo_id}@refs/pr/N) or convert the weights"
                )
            raise Pbs2pError(f"Hugging Face model {ref} has no *.safetensors weights at its top level")
        if "config.json" not in wanted:
            raise Pbs2pError(f"Hugging Face repo {ref} has no config.json: it is not a transformers model")
        files = tuple(_hub_file(names[n]) for n in wanted)
        model = HubModel(ref, info.sha, files)
        if model.total > settings.max_model_bytes:
            raise Pbs2pError(
                f"Hugging Face model {ref} is {_gb(model.total)} (safetensors, config and tokenizer files), above "
                f"this service's limit of {_gb(settings.max_model_bytes)} (PBS2P_MAX_MODEL_BYTES); raise the "
                f"limit or choose a smaller model"
            )
        check_config(_read_config(model, settings), str(ref))
    except (HfHubHTTPError, httpx2.HTTPError, OfflineModeIsEnabled) as exc:
        raise hub_error(exc, ref, settings) from None
    return model


def _hub_file(sibling: Any) -> HubFile:
    lfs = sibling.lfs
    return HubFile(sibling.rfilename, sibling.size, lfs.sha256 if lfs else None, None if lfs else sibling.blob_id)


def _read_config(model: HubModel, settings: WorkerSettings) -> dict[str, Any]:
    url = hf_hub_url(model.ref.repo_id, "config.json", revision=model.commit, endpoint=settings.hf_endpoint)
    headers = build_hf_headers(token=_token(settings), library_name="pbs2p")
    r = get_session().get(url, headers=headers, timeout=_TIMEOUT, follow_redirects=True)
    hf_raise_for_status(r)
    try:
        config = json.loads(r.content)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Pbs2pError(f"config.json of Hugging Face model {model.ref} is not valid JSON") from None
    if not isinstance(config, dict):
        raise Pbs2pError(f"config.json of Hugging Face model {model.ref} is not a JSON object")
    return config


def check_config(config: dict[str, Any], where: str) -> None:
    """A model config pbs2p can compress without running the repo's code: no `auto_map`, a supported family."""
    if "auto_map" in config:
        raise Pbs2pError(
            f"model {where} needs its own code (config.json has auto_map, i.e. trust_remote_code), which pbs2p "
            f"never runs; use a model of a family transformers implements: {', '.join(sorted(FAMILIES))}"
        )
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise Pbs2pError(
            f"model {where} has model type {model_type!r}, which pbs2p does not compress yet; supported: "
            f"{', '.join(sorted(FAMILIES))}"
        )


def hub_error(exc: BaseException, ref: HubRef, settings: WorkerSettings) -> Pbs2pError:
    """What went wrong talking to the hub, and what to do (never with the token)."""
    hub = settings.hf_endpoint
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        if status == 403 or settings.hf_token is not None:
            return Pbs2pError(
                f"Hugging Face model {ref.repo_id} is gated and the token in HF_TOKEN has no access yet; request "
                f"access on {hub}/{ref.repo_id} with that account"
            )
        return Pbs2pError(
            f"Hugging Face model {ref.repo_id} is gated: accept its conditions on {hub}/{ref.repo_id}, then set "
            f"HF_TOKEN on the service (or for `pbs2p`) to a token of that account"
        )
    if isinstance(exc, RevisionNotFoundError):
        return Pbs2pError(
            f"revision {ref.rev!r} of Hugging Face model {ref.repo_id} does not exist; give a branch, tag or commit "
            f"of the repo (default {DEFAULT_REVISION!r})"
        )
    if isinstance(exc, RepositoryNotFoundError):
        token = "the token in HF_TOKEN cannot read it" if settings.hf_token is not None else "no HF_TOKEN is set"
        return Pbs2pError(
            f"Hugging Face model {ref.repo_id} was not found on {hub} (or it is private and {token}); check the id "
            f"(org/name, as on the hub's page) or set HF_TOKEN"
        )
    if isinstance(exc, RemoteEntryNotFoundError):
        return Pbs2pError(f"a file of Hugging Face model {ref} is missing on {hub}: {exc}")
    if status == 401:
        return Pbs2pError(f"the hub at {hub} refused the token in HF_TOKEN (401); set a valid token")
    if isinstance(exc, HfHubHTTPError) and status is not None and status < 500:
        return Pbs2pError(f"the hub at {hub} answered {status} for {ref}: {exc.server_message or exc}")
    if isinstance(exc, HfHubHTTPError):
        return HubUnreachable(f"the hub at {hub} answered {status} for {ref}; try again later")
    if isinstance(exc, OfflineModeIsEnabled):
        return _offline_error(ref, settings)
    return HubUnreachable(
        f"cannot reach the hub at {hub} for {ref} ({type(exc).__name__}: {exc}); check the network or HF_ENDPOINT, "
        f"or set HF_HUB_OFFLINE=1 to use only models already in the cache"
    )


# ---------------------------------------------------------------------------------------------- the cache


def repo_dir(repo_id: str, settings: WorkerSettings) -> Path:
    return settings.hub_dir / repo_id.replace("/", "--")


def _ref_file(ref: HubRef, settings: WorkerSettings) -> Path:
    return repo_dir(ref.repo_id, settings) / "refs" / quote(ref.rev, safe="")


def _complete(path: Path) -> bool:
    return (path / SOURCE_FILE).is_file()


def cached_hub_model(ref: HubRef, settings: WorkerSettings) -> Path | None:
    """The cached directory of `ref` without asking the hub (a commit, or a revision fetched before)."""
    commit = ref.rev
    if not COMMIT.match(commit):
        try:
            commit = _ref_file(ref, settings).read_text().strip()
        except OSError:
            return None
    path = repo_dir(ref.repo_id, settings) / commit
    return path if COMMIT.match(commit) and _complete(path) else None


def _offline_error(ref: HubRef, settings: WorkerSettings) -> Pbs2pError:
    return Pbs2pError(
        f"Hugging Face model {ref} is not in pbs2p's model cache ({settings.hub_dir}) and offline mode is on "
        f"(HF_HUB_OFFLINE=1 or PBS2P_HF_OFFLINE=1): fetch it once with the hub reachable, or run "
        f"`hf download {ref.repo_id} --revision {ref.rev} --local-dir DIR` and give DIR as the model"
    )


def check_hub_ref(ref: HubRef, settings: WorkerSettings) -> None:
    """Checks at submit time: offline, the model must be cached; online, `inspect_hub_model`'s checks (a hub that
    cannot be reached is no refusal: the job tries again when it runs)."""
    if settings.hf_offline:
        if cached_hub_model(ref, settings) is None:
            raise _offline_error(ref, settings)
        return
    try:
        inspect_hub_model(ref, settings)
    except HubUnreachable as exc:
        log.warning("%s; the job will try again when it runs", exc)


def fetch_hub_model(ref: HubRef, settings: WorkerSettings, progress: ProgressBytes | None = None) -> Path:
    """The model directory of `ref`, downloaded once per commit (see the module doc)."""
    if settings.hf_offline:
        path = cached_hub_model(ref, settings)
        if path is None:
            raise _offline_error(ref, settings)
        return path
    model = inspect_hub_model(ref, settings)
    folder = repo_dir(ref.repo_id, settings)
    target = folder / model.commit
    if not _complete(target):
        folder.mkdir(parents=True, exist_ok=True)
        with file_lock(folder / f".{model.commit}.lock"):
            if not _complete(target):
                _download(model, target, settings, progress)
    ref_file = _ref_file(ref, settings)
    ref_file.parent.mkdir(exist_ok=True)
    tmp = ref_file.with_name(f".{ref_file.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_text(model.commit)
    tmp.replace(ref_file)
    return target


def _download(model: HubModel, target: Path, settings: WorkerSettings, progress: ProgressBytes | None) -> None:
    partial = target.with_name(f".partial-{model.commit}")  # kept when interrupted: the next try goes on from it
    done = sum(f.size or 0 for f in model.files if _size(partial / f.name) == f.size)
    free = shutil.disk_usage(target.parent).free
    if model.total - done > free:
        raise Pbs2pError(
            f"Hugging Face model {model.ref} needs {_gb(model.total - done)} more in {settings.hub_dir}, which has "
            f"{_gb(free)} free; free space there or set PBS2P_CACHE_DIR to a larger disk"
        )
    log.info("downloading %s (commit %s, %s) into %s", model.ref, model.commit, _gb(model.total), target)
    counter = _ByteCounter(done, model.total, progress)
    counter.report(done, force=True)
    try:
        snapshot_download(
            model.ref.repo_id,
            revision=model.commit,
            local_dir=partial,
            allow_patterns=[glob.escape(f.name) for f in model.files],
            endpoint=settings.hf_endpoint,
            token=_token(settings),
            library_name="pbs2p",
            tqdm_class=counter.bar_class(),  # type: ignore[arg-type]
            max_workers=4,
        )
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            shutil.rmtree(partial, ignore_errors=True)
            raise Pbs2pError(
                f"the disk of {settings.hub_dir} filled up while downloading {model.ref} ({exc.strerror}); the "
                f"partial download was removed: free {_gb(model.total)} there or set PBS2P_CACHE_DIR to a larger disk"
            ) from None
        if isinstance(exc, HfHubHTTPError):
            raise hub_error(exc, model.ref, settings) from None
        raise
    except httpx2.HTTPError as exc:
        raise hub_error(exc, model.ref, settings) from None
    files = _verify(model, partial)
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping of the download
    source = {"model": model.ref.repo_id, "commit": model.commit, "files": files}
    (partial / SOURCE_FILE).write_text(json.dumps(source, indent=1, sort_keys=True))
    partial.chmod(0o755)
    try:
        partial.rename(target)
    except OSError:
        if not _complete(target):  # another machine sharing the cache may have won the race: its copy is as good
            raise Pbs2pError(f"{target} exists but is not a complete download; delete it and run again") from None
        shutil.rmtree(partial, ignore_errors=True)
    counter.report(model.total, force=True)
    log.info("model %s ready at %s", model.ref, target)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _verify(model: HubModel, partial: Path) -> dict[str, dict[str, Any]]:
    """Each file as the hub describes it (size, then sha256 or git blob id); its size and sha256."""
    out: dict[str, dict[str, Any]] = {}
    for f in model.files:
        path = partial / f.name
        size = _size(path)
        sha256 = file_sha256(path) if size is not None else None
        ok = size is not None and (f.size is None or size == f.size)
        if ok and f.sha256 is not None:
            ok = sha256 == f.sha256
        elif ok and f.blob_id is not None:
            ok = _git_blob_id(path, size or 0) == f.blob_id
        if not ok:
            path.unlink(missing_ok=True)
            raise Pbs2pError(
                f"{f.name} of Hugging Face model {model.ref} does not match the hub's checksum after download; it "
                f"was removed: run the job again"
            )
        out[f.name] = {"size": size, "sha256": sha256}
    return out


def _git_blob_id(path: Path, size: int) -> str:
    h = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _ByteCounter:
    """Bytes of a snapshot download, reported as (done, total) at most every 0.5 s, from huggingface_hub's
    progress bars (`tqdm_class`): its byte bars all count the file bytes written; the largest is taken. Once the
    report raised (a cancelled job), every further update raises too, so each download thread stops."""

    def __init__(self, base: int, total: int, progress: ProgressBytes | None) -> None:
        self.base, self.total, self.progress = base, total, progress
        self.lock = threading.Lock()
        self.bytes = 0
        self.last = 0.0
        self.error: BaseException | None = None

    def seen(self, n: int) -> None:
        with self.lock:
            if self.error is not None:
                raise self.error
            self.bytes = max(self.bytes, n)
            try:
                self.report(self.base + self.bytes)
            except BaseException as exc:
                self.error = exc
                raise

    def report(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is not None and (force or now - self.last >= 0.5):
            self.last = now
            self.progress(min(done, self.total), self.total)

    def bar_class(self) -> type:
        counter = self

        class Bar:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.counts = kwargs.get("unit") == "B"
                self.n = 0
                self.total = kwargs.get("total")
                self.format_dict: dict[str, Any] = {}
                if kwargs.get("initial"):
                    self.update(kwargs["initial"])

            def update(self, n: float | None = 1) -> None:
                self.n += int(n or 0)
                if self.counts:
                    counter.seen(self.n)

            def __enter__(self) -> Bar:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def __getattr__(self, name: str) -> Callable[..., None]:  # refresh, close, set_description, ...
                return lambda *args, **kwargs: None

        return Bar
