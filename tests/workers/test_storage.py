"""Object storage: both backends through the same tests; S3 over real HTTP against moto's server on 127.0.0.1.

The S3 endpoint is `python -m moto.server` in a subprocess (one per session), reached by boto3 over the
loopback like any S3-compatible server. Small multipart settings (5 MiB parts, S3's minimum) keep it quick.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import tempfile
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
from botocore.exceptions import ConnectionClosedError
from pydantic import ValidationError

import pbs2p.workers.storage.s3 as s3_module
from pbs2p.workers.storage import (
    ChecksumMismatch,
    LocalStorage,
    ObjectNotFound,
    S3Settings,
    Storage,
    StorageError,
    join_key,
    storage_from_url,
)
from pbs2p.workers.storage.s3 import S3Storage

MiB = 1024 * 1024
CREDS = {"access_key": "testing", "secret_key": "testing"}
PREFIX = "jobs/t"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever the env says


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _s3(endpoint: str, bucket: str, **kw: Any) -> S3Storage:
    opts: dict[str, Any] = {"multipart_threshold": 5 * MiB, "part_size": 5 * MiB, **CREDS, **kw}
    return S3Storage(bucket, PREFIX, endpoint_url=endpoint, path_style=True, **opts)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return _s3(endpoint, request.getfixturevalue("bucket"))


def _overwrite_raw(store: Storage, key: str, data: bytes) -> None:
    """Replace an object's bytes behind the backend's back, leaving its stored sha256 (if any) stale."""
    if isinstance(store, LocalStorage):
        (store.root / key).write_bytes(data)
    else:
        assert isinstance(store, S3Storage)
        full = join_key(store.prefix, key)
        meta = store.client.head_object(Bucket=store.bucket, Key=full)["Metadata"]
        store.client.put_object(Bucket=store.bucket, Key=full, Body=data, Metadata=meta)


def _record_writes(store: Storage, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Keys in the order their content became visible: local renames, S3 PutObject / CompleteMultipartUpload."""
    order: list[str] = []
    if isinstance(store, LocalStorage):
        real_replace = os.replace

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            real_replace(src, dst, *args, **kwargs)
            if store.root in Path(dst).parents:
                order.append(Path(dst).relative_to(store.root).as_posix())

        monkeypatch.setattr(os, "replace", replace)
    else:
        assert isinstance(store, S3Storage)

        def on_request(params: dict[str, Any], **_: Any) -> None:
            order.append(params["Key"][len(store.prefix) + 1 :])

        for op in ("PutObject", "CompleteMultipartUpload"):
            store.client.meta.events.register(f"before-parameter-build.s3.{op}", on_request)
    return order


def _make_dir(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"model_type": "llama"}\n',
        "pbs2p-00001.safetensors": os.urandom(6 * MiB),  # above the 5 MiB threshold: multipart on S3
        "sub/tokenizer.json": os.urandom(1000),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


# ---------------------------------------------------------------------------------------------- both backends


def test_round_trip_verifies_sha256(store: Storage, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)

    info = store.put_file(src, "a/blob.bin")
    assert (info.key, info.size, info.sha256) == ("a/blob.bin", len(data), _sha(data))
    got = store.get_file("a/blob.bin", tmp_path / "out" / "blob.bin")
    assert (tmp_path / "out" / "blob.bin").read_bytes() == data
    assert got.sha256 == _sha(data)

    assert store.put_bytes(b"hello", "a/hello.txt").sha256 == _sha(b"hello")
    assert store.get_bytes("a/hello.txt", expected_sha256=_sha(b"hello")) == b"hello"

    with pytest.raises(ChecksumMismatch, match=r"blob\.bin.*sha256"):
        store.get_file("a/blob.bin", tmp_path / "bad.bin", expected_sha256=_sha(b"other"))
    assert not (tmp_path / "bad.bin").exists()
    with pytest.raises(ChecksumMismatch):
        store.get_bytes("a/hello.txt", expected_sha256=_sha(b"other"))
    with pytest.raises(ChecksumMismatch, match="nothing was"):  # the source is not what the caller said
        store.put_file(src, "a/claimed.bin", sha256=_sha(b"other"))
    assert not store.exists("a/claimed.bin")
    with pytest.raises(ObjectNotFound, match="missing.bin"):
        store.get_bytes("a/missing.bin")


def test_list_exists_delete_prefix(store: Storage) -> None:
    for key, data in [("a/1", b"1"), ("a/2", b"22"), ("a/b/3", b"333"), ("ab/4", b"4444")]:
        store.put_bytes(data, key)
    assert [(i.key, i.size) for i in store.list("a/")] == [("a/1", 1), ("a/2", 2), ("a/b/3", 3)]
    assert [i.key for i in store.list("a")] == ["a/1", "a/2", "a/b/3", "ab/4"]  # a string prefix, as in S3
    assert [i.key for i in store.list("")] == ["a/1", "a/2", "a/b/3", "ab/4"]
    assert store.list("nothing/") == []
    assert store.exists("a/b/3") and not store.exists("a/b") and not store.exists("a/9")

    assert store.delete_prefix("a/") == 3
    assert [i.key for i in store.list()] == ["ab/4"]
    assert not store.exists("a/1")
    store.delete("ab/4")
    store.delete("ab/4")  # deleting a missing object is not an error
    assert store.list() == []


def test_upload_dir_writes_manifest_last_and_download_verifies(
    store: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "art"
    files = _make_dir(src)
    store.put_bytes(b'{"files": {}}', "art/manifest.json")  # an older upload's manifest
    order = _record_writes(store, monkeypatch)
    manifest_seen: list[tuple[str, bool]] = []

    written = store.upload_dir(
        src, "art", on_put=lambda i: manifest_seen.append((i.key, store.exists("art/manifest.json")))
    )

    names = sorted(files)
    assert order == [f"art/{n}" for n in names] + ["art/manifest.json"]
    # the old manifest was gone before the first new file went up: no reader pairs it with new files
    assert manifest_seen == [(f"art/{n}", False) for n in names] + [("art/manifest.json", True)]
    assert [i.key for i in written] == [f"art/{n}" for n in names] + ["art/manifest.json"]
    manifest = json.loads(store.get_bytes("art/manifest.json"))
    assert manifest["files"] == {n: {"size": len(d), "sha256": _sha(d)} for n, d in files.items()}

    dest = tmp_path / "down"
    got = store.download_dir("art", dest)
    assert {i.key for i in got} == {f"art/{n}" for n in names} | {"art/manifest.json"}
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    assert json.loads((dest / "manifest.json").read_text()) == manifest


def test_upload_dir_keeps_an_artifact_manifest_and_checks_it(store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "art"
    files = _make_dir(src)
    own = {"format": "pbs2p", "files": {n: {"size": len(d), "sha256": _sha(d)} for n, d in files.items()}}
    (src / "manifest.json").write_text(json.dumps(own))

    store.upload_dir(src, "ok")
    assert store.get_bytes("ok/manifest.json") == (src / "manifest.json").read_bytes()  # uploaded as is

    (src / "sub" / "tokenizer.json").write_bytes(b"changed after the manifest was written")
    with pytest.raises(ChecksumMismatch, match="tokenizer.json"):
        store.upload_dir(src, "bad")
    assert not store.exists("bad/manifest.json")  # an incomplete upload never looks complete


def test_corrupted_object_is_detected_on_download(store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "art"
    files = _make_dir(src)
    store.upload_dir(src, "art")
    _overwrite_raw(store, "art/config.json", b'{"model_type": "evil"}\n')

    dest = tmp_path / "down"
    with pytest.raises(ChecksumMismatch, match=r"art/config\.json fails its sha256 check"):
        store.download_dir("art", dest)
    assert not (dest / "manifest.json").exists()  # the local copy does not look complete
    assert not (dest / "config.json").exists()

    sha = _sha(files["config.json"])
    with pytest.raises(ChecksumMismatch):
        store.get_file("art/config.json", tmp_path / "c.json", expected_sha256=sha)
    if isinstance(store, S3Storage):  # S3 keeps the sha256 as metadata: caught without being told
        with pytest.raises(ChecksumMismatch, match="corrupted"):
            store.get_bytes("art/config.json")


def test_url_fetches_the_exact_bytes(store: Storage) -> None:
    data = os.urandom(100_000)
    store.put_bytes(data, "u/blob.bin")
    url = store.url("u/blob.bin", expires=60)
    assert url is not None
    if isinstance(store, S3Storage):
        assert url.startswith("http://127.0.0.1:") and "X-Amz-Signature=" in url  # SigV4 presigned GET
    with _NO_PROXY.open(url, timeout=10) as r:
        assert r.read() == data


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../b", "a//b", "./a", "", "a\\b", "x.pbs2p-partial"])
def test_keys_are_confined(store: Storage, key: str) -> None:
    with pytest.raises(StorageError, match="key"):
        store.put_bytes(b"x", key)
    with pytest.raises(StorageError):
        store.get_bytes(key)


# ---------------------------------------------------------------------------------------------- S3


def _b64_sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _sent_parts(s3: S3Storage) -> dict[int, tuple[int, str | None]]:
    """{part number: (bytes, x-amz-checksum-sha256 header)} of the UploadPart requests as they go out."""
    sent: dict[int, tuple[int, str | None]] = {}

    def on_send(request: Any, **_: Any) -> None:
        number = int(urllib.parse.parse_qs(urllib.parse.urlsplit(request.url).query)["partNumber"][0])
        checksum = request.headers.get("x-amz-checksum-sha256")
        sent[number] = (int(request.headers["Content-Length"]), checksum.decode() if checksum else None)

    s3.client.meta.events.register("before-send.s3.UploadPart", on_send)
    return sent


@pytest.mark.parametrize("checksums", [True, False])
def test_s3_multipart_upload(s3_endpoint: str, bucket: str, s3_client: Any, tmp_path: Path, checksums: bool) -> None:
    """Above the 5 MiB threshold a file goes up as boto3's managed multipart upload, in 5 MiB parts."""
    s3 = _s3(s3_endpoint, bucket, checksums=checksums)
    sent = _sent_parts(s3)
    data = os.urandom(12 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)

    info = s3.put_file(src, "big.bin")

    assert info.sha256 == _sha(data) and info.size == len(data)
    parts = [data[i : i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    # each part's SHA256 is sent for the server to check, unless checksums are off
    assert sent == {n: (len(p), _b64_sha(p) if checksums else None) for n, p in enumerate(parts, start=1)}
    head = s3_client.head_object(Bucket=bucket, Key=f"{PREFIX}/big.bin")
    assert head["Metadata"]["sha256"] == _sha(data) and head["ContentLength"] == len(data)
    assert s3_client.get_object(Bucket=bucket, Key=f"{PREFIX}/big.bin")["Body"].read() == data
    got = s3.get_file("big.bin", tmp_path / "back.bin")  # a ranged download, verified against the metadata
    assert got.sha256 == _sha(data) and (tmp_path / "back.bin").read_bytes() == data
    assert "Uploads" not in s3_client.list_multipart_uploads(Bucket=bucket)

    sent.clear()
    assert s3.put_bytes(data, "big-bytes.bin").sha256 == _sha(data)  # bytes above the threshold: multipart too
    assert sorted(sent) == [1, 2, 3]
    head = s3_client.head_object(Bucket=bucket, Key=f"{PREFIX}/big-bytes.bin")
    assert head["Metadata"]["sha256"] == _sha(data) and s3.get_bytes("big-bytes.bin") == data


def test_s3_refused_upload_missing_bucket(s3_endpoint: str, tmp_path: Path) -> None:
    s3 = _s3(s3_endpoint, "no-such-bucket-pbs2p")
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-pbs2p/jobs/t/small\.bin: NoSuchBucket.*bucket name"):
        s3.put_bytes(b"x", "small.bin")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(6 * MiB))
    with pytest.raises(StorageError, match=r"multipart upload of .*big\.bin: NoSuchBucket"):
        s3.put_file(src, "big.bin")


def test_s3_refused_upload_by_bucket_policy(s3_endpoint: str, bucket: str, s3_client: Any) -> None:
    deny = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/*"}
        ],
    }
    s3_client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(deny))
    s3 = _s3(s3_endpoint, bucket)
    with pytest.raises(StorageError, match=r"refused to upload .*/jobs/t/denied\.bin: .*HTTP 403.*credentials"):
        s3.put_bytes(b"x", "denied.bin")
    assert not s3.exists("denied.bin")
    assert s3.list() == []


def test_s3_wrong_credentials(s3_endpoint: str, bucket: str) -> None:
    """moto accepts any credentials until its IAM checks are switched on (moto-api/reset-auth)."""
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )
    user = f"u{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    allow = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(allow))
    key = iam.create_access_key(UserName=user)["AccessKey"]

    def set_auth(after: str) -> None:
        url = f"{s3_endpoint}/moto-api/reset-auth"  # body: how many requests may still go unauthenticated
        req = urllib.request.Request(url, data=after.encode(), headers={"Content-Type": "text/plain"})
        _NO_PROXY.open(req, timeout=5).close()

    set_auth("0")  # every request from here on is authenticated and authorised
    try:
        good = _s3(s3_endpoint, bucket, access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"])
        good.put_bytes(b"ok", "ok.bin")
        unknown = _s3(s3_endpoint, bucket, access_key="AKIAUNKNOWNKEY000000", secret_key="wrong")
        with pytest.raises(StorageError, match=r"jobs/t/x\.bin: InvalidAccessKeyId.*AWS_ACCESS_KEY_ID"):
            unknown.put_bytes(b"x", "x.bin")
        bad_secret = _s3(s3_endpoint, bucket, access_key=key["AccessKeyId"], secret_key="wrong")
        with pytest.raises(StorageError, match=r"jobs/t/x\.bin: SignatureDoesNotMatch.*AWS_SECRET_ACCESS_KEY"):
            bad_secret.put_bytes(b"x", "x.bin")
        assert [i.key for i in good.list()] == ["ok.bin"]
    finally:
        set_auth("inf")


def test_s3_upload_failing_midway_leaves_nothing(s3_endpoint: str, bucket: str, s3_client: Any, tmp_path: Path) -> None:
    """The connection drops at part 2: boto3 aborts the multipart upload; no object, no upload left open."""
    s3 = _s3(s3_endpoint, bucket, max_attempts=1)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))
    calls: list[str] = []
    s3.client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))

    def drop_part_2(request: Any, **_: Any) -> None:
        if "partNumber=2&" in request.url + "&":
            raise ConnectionClosedError(endpoint_url=request.url)

    s3.client.meta.events.register("before-send.s3.UploadPart", drop_part_2)
    with pytest.raises(StorageError, match=r"cannot reach http://127\.0\.0\.1:\d+ to upload .*/jobs/t/big\.bin"):
        s3.put_file(src, "big.bin")
    assert calls.count("CreateMultipartUpload") == 1 and "UploadPart" in calls
    assert "AbortMultipartUpload" in calls and "CompleteMultipartUpload" not in calls
    assert "Uploads" not in s3_client.list_multipart_uploads(Bucket=bucket)
    assert not s3.exists("big.bin")
    assert s3_client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


class _FileFailingAt:
    """A file whose reads from byte `at` on go through `fail` (a failing disk, a file changed meanwhile)."""

    def __init__(self, f: IO[bytes], at: int, fail: Callable[[IO[bytes], int], bytes]) -> None:
        self._f, self._at, self._fail = f, at, fail

    def read(self, n: int = -1) -> bytes:
        return self._fail(self._f, n) if self._f.tell() >= self._at else self._f.read(n)

    def __getattr__(self, name: str) -> Any:  # readinto (the hashing before the upload), seek, tell, close
        return getattr(self._f, name)

    def __enter__(self) -> _FileFailingAt:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _io_error(f: IO[bytes], n: int) -> bytes:
    raise OSError(errno.EIO, "Input/output error")


def _other_bytes(f: IO[bytes], n: int) -> bytes:
    return os.urandom(len(f.read(n)))


@pytest.mark.parametrize(
    ("fail", "error", "match"),
    [
        (_io_error, StorageError, r"big\.bin.*Input/output error; the multipart upload was aborted"),
        (_other_bytes, ChecksumMismatch, r"big\.bin has sha256 .* while uploaded.* changed .*; the upload .* aborted"),
    ],
)
def test_s3_multipart_failure_is_aborted(
    s3_endpoint: str,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fail: Callable[[IO[bytes], int], bytes],
    error: type[Exception],
    match: str,
) -> None:
    """The source fails as the upload reads part 2: the disk fails, or the file changed after it was hashed."""
    s3 = _s3(s3_endpoint, bucket)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))

    def open_failing(path: Any, *args: Any, **kwargs: Any) -> Any:
        f = open(path, *args, **kwargs)  # noqa: SIM115
        return _FileFailingAt(f, 5 * MiB, fail) if path == src else f

    monkeypatch.setattr(s3_module, "open", open_failing, raising=False)
    with pytest.raises(error, match=match):
        s3.put_file(src, "big.bin")
    assert "Uploads" not in s3_client.list_multipart_uploads(Bucket=bucket)
    assert not s3.exists("big.bin")


_S3_ENV = {
    "PBS2P_S3_ENDPOINT_URL": "http://127.0.0.1:9",
    "PBS2P_S3_REGION": "eu-west-3",
    "PBS2P_S3_PATH_STYLE": "true",
    "PBS2P_S3_CHECKSUMS": "0",
    "PBS2P_S3_MULTIPART_THRESHOLD": "16MiB",
    "PBS2P_S3_PART_SIZE": "8MiB",
    "PBS2P_S3_MAX_CONCURRENCY": "2",
    "PBS2P_S3_MAX_ATTEMPTS": "3",
    "AWS_ACCESS_KEY_ID": "ak",
    "AWS_SECRET_ACCESS_KEY": "sk",
    "AWS_SESSION_TOKEN": "tok",
}


def test_s3_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry point reads S3Settings() from PBS2P_S3_* and AWS_* and passes it to storage_from_url."""
    for name, value in _S3_ENV.items():
        monkeypatch.setenv(name, value)
    settings = S3Settings()
    assert settings.to_dict() == {
        "endpoint_url": "http://127.0.0.1:9",
        "region": "eu-west-3",
        "path_style": True,
        "checksums": False,
        "multipart_threshold": 16 * MiB,
        "part_size": 8 * MiB,
        "max_concurrency": 2,
        "max_attempts": 3,
        "access_key": "ak",
        "secret_key": "sk",
        "session_token": "tok",
    }
    assert "sk" not in repr(settings) and "tok" not in repr(settings)

    s3 = storage_from_url("s3://my-bucket/some/prefix/", settings)
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.endpoint_url, s3.region) == (
        "my-bucket",
        "some/prefix",
        "http://127.0.0.1:9",
        "eu-west-3",
    )
    assert (s3.multipart_threshold, s3.part_size, s3.checksums) == (16 * MiB, 8 * MiB, False)
    assert (s3.transfer.multipart_threshold, s3.transfer.multipart_chunksize) == (16 * MiB, 8 * MiB)
    assert s3.transfer.max_request_concurrency == 2 and s3.transfer.num_download_attempts == 1 + 3
    config = s3.client.meta.config
    assert config.s3["addressing_style"] == "path" and config.signature_version == "s3v4"
    assert config.retries["total_max_attempts"] == 1 + 3  # botocore's max_attempts counts the retries
    url = s3.url("k.bin", expires=60)  # signed here, with the keys from the environment
    assert url is not None and url.startswith("http://127.0.0.1:9/my-bucket/some/prefix/k.bin?")
    assert "X-Amz-Credential=ak%2F" in url and "%2Feu-west-3%2Fs3%2F" in url and "X-Amz-Security-Token=tok" in url

    # to another process as a plain dict: the same settings back, whatever that process's environment says
    values = settings.to_dict()
    monkeypatch.setenv("PBS2P_S3_REGION", "us-west-2")
    assert S3Settings.from_dict(values).to_dict() == values
    with pytest.raises(StorageError, match="unknown S3 settings"):
        S3Settings.from_dict({**values, "endpoint": "x"})

    monkeypatch.setenv("PBS2P_S3_PATH_STYLE", "maybe")
    with pytest.raises(ValidationError, match="PBS2P_S3_PATH_STYLE='maybe' is not a boolean"):
        S3Settings()
    monkeypatch.setenv("PBS2P_S3_PATH_STYLE", "1")
    with pytest.raises(ValidationError, match="part_size"):
        S3Settings(part_size="1MiB")  # below S3's minimum part size
    with pytest.raises(ValidationError, match="endpoint"):
        S3Settings(endpoint="x")  # no such setting


def test_storage_from_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without settings, an s3:// URL gets S3Settings' defaults: the environment is not read here."""
    assert isinstance(storage_from_url(str(tmp_path)), LocalStorage)
    local = storage_from_url(f"file://{tmp_path}/x y")
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "x y"

    for name, value in _S3_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):  # boto3's own region lookup
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    s3 = storage_from_url("s3://my-bucket/some/prefix/")
    assert isinstance(s3, S3Storage)
    defaults = S3Settings.defaults()
    assert (s3.bucket, s3.prefix, s3.endpoint_url, s3.region) == ("my-bucket", "some/prefix", None, "us-east-1")
    assert (s3.multipart_threshold, s3.part_size, s3.checksums) == (64 * MiB, 64 * MiB, True)
    assert (s3.part_size, s3.transfer.max_request_concurrency) == (defaults.part_size, defaults.max_concurrency)
    assert s3.client.meta.config.s3["addressing_style"] == "auto"
    assert s3.client.meta.config.retries["total_max_attempts"] == 1 + defaults.max_attempts
    other = storage_from_url("s3://my-bucket", S3Settings(region="us-west-2", path_style=False))
    assert isinstance(other, S3Storage) and other.region == "us-west-2" and other.prefix == ""

    for bad in ["gs://b/p", "http://host/x", "s3://", "s3:/bucket", "file://host/x", "s3://Bad_Bucket/p"]:
        with pytest.raises(StorageError, match=r"s3://BUCKET/PREFIX|file:///"):
            storage_from_url(bad)


# ---------------------------------------------------------------------------------------------- local


@pytest.mark.parametrize("fails", ["write", "fsync"])
def test_local_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str) -> None:
    store = LocalStorage(tmp_path / "store")
    store.put_bytes(b"version 1", "ckpt/block.bin")
    calls = {"n": 0}

    def enospc_under_store(real: Callable[..., Any]) -> Callable[..., Any]:
        def fn(fd: int, *args: Any) -> Any:
            if str(store.root) in os.readlink(f"/proc/self/fd/{fd}"):
                calls["n"] += 1
                if fails == "fsync" or calls["n"] > 1:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(fd, args[0][:1000])  # a short write lands, the next one finds the disk full
            return real(fd, *args)

        return fn

    monkeypatch.setattr(os, fails, enospc_under_store(getattr(os, fails)))
    with pytest.raises(StorageError, match=r"cannot write 'ckpt/block\.bin' to .*: no space left on the device"):
        store.put_bytes(os.urandom(3 * MiB), "ckpt/block.bin")
    monkeypatch.undo()
    assert store.get_bytes("ckpt/block.bin") == b"version 1"  # the old object, whole
    assert sorted(p.name for p in (store.root / "ckpt").iterdir()) == ["block.bin"]  # no partial file left
    assert calls["n"] >= 1


def test_local_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "store"
    root.mkdir()
    root.chmod(0o500)
    if os.geteuid() == 0:  # root ignores directory permissions: have the temp file refused instead

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    try:
        with pytest.raises(StorageError, match=r"cannot write 'x\.bin' to .*permission denied.*writable"):
            LocalStorage(root).put_bytes(b"x", "x.bin")
    finally:
        root.chmod(0o700)
    assert list(root.iterdir()) == []


def test_local_symlink_out_of_root_refused(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    (tmp_path / "store").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "store" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(StorageError, match="outside"):
        store.put_bytes(b"x", "link/x.bin")
    assert not (tmp_path / "outside" / "x.bin").exists()
