"""Fixtures shared by every layer's tests: the real packaged model, a real S3 endpoint, the pytest plumbing
around `pbs2p_testing` (which holds the fixtures' code, shared with bench/)."""

import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pbs2p.testing.real import missing_packages, real_model_dir
from pbs2p.testing.servers import moto_server


def _missing(msg: str) -> None:
    """Skip loudly where a test's real dependency is missing; under CI (CI=true) its absence is a failure."""
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The packaged SmolLM2-135M as a safetensors directory (prepared once into $PBS2P_CACHE_DIR)."""
    missing = missing_packages()
    if missing:
        _missing(f"real model/text packages not installed: {missing} (make venv installs them)")
    return real_model_dir()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls on a shared 2-core machine: one intra-op thread is ~20x faster than two contending."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 endpoint: moto's server as a subprocess on 127.0.0.1, stopped at the end of the session."""
    if importlib.util.find_spec("moto") is None:
        _missing("moto[server] is not installed (pip install -e '.[dev]')")
    mp = pytest.MonkeyPatch()
    mp.setenv("NO_PROXY", "127.0.0.1,localhost")
    mp.setenv("no_proxy", "127.0.0.1,localhost")
    try:
        with moto_server(tmp_path_factory.mktemp("moto") / "server.log") as url:
            yield url
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> Any:
    """A raw boto3 client, to set up and inspect the server behind the backend's back."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


@pytest.fixture
def bucket(s3_client: Any) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name
