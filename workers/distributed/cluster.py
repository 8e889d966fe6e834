"""Joining or starting the Ray cluster, and what each of a job's workers asks it for."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray._private import ray_constants
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

from pbs2p.core.errors import Pbs2pError

log = logging.getLogger(__name__)

NAMESPACE = "pbs2p"


class WorkerRestarted(Exception):
    """A worker was asked for a step of a block whose earlier steps ran in the process Ray replaced."""


LOST = (RayActorError, ObjectLostError, WorkerCrashedError, NodeDiedError, WorkerRestarted)


def _token_available() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return (
        bool(os.environ.get("RAY_AUTH_TOKEN"))
        or (Path(path).is_file() if path else False)
        or (Path.home() / ".ray" / "auth_token").is_file()
    )


def init_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None) -> str:
    """Join the cluster at `address` ("auto", "host:port", "ray://host:port"), or start a local one on 127.0.0.1
    with `num_cpus` (default: every core). Returns the cluster's address, for other drivers to join.

    RAY_AUTH_MODE is always set before Ray starts (Ray 2.60 turns token auth on for a new cluster when it is
    unset): a local cluster listens on 127.0.0.1 only and runs without tokens; joining a cluster uses token
    auth when a token is available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token). An explicit
    RAY_AUTH_MODE in the environment wins."""
    if ray.is_initialized():
        return str(ray.get_runtime_context().gcs_address)
    local = address in (None, "", "local")
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "disabled" if local or not _token_available() else "token"
    kw: dict[str, Any] = dict(namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=True)
    if local:
        # loopback only: Ray reads this switch when it is imported, so the constant is set too
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            object_store_memory=object_store_memory,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **kw,
        )
    else:
        ray.init(address=address, **kw)
    gcs = str(ray.get_runtime_context().gcs_address)
    log.info("Ray cluster at %s (auth %s): %s", gcs, os.environ["RAY_AUTH_MODE"], ray.cluster_resources())
    return gcs


def shutdown_ray() -> None:
    """Disconnect this process from Ray (a local cluster it started stops with it)."""
    if ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class Resources:
    """What each of a job's workers asks the cluster for, and the device its math runs on."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    memory_per_worker: int | None  # bytes (Ray's `memory` resource), None: not reserved
    device: str

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_worker))


def plan_resources(
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    memory_per_worker: int | None = None,
) -> Resources:
    """Workers ask for GPUs when the cluster has some (one each by default), CPUs otherwise; by default there
    are as many workers as the cluster has GPUs (or CPUs / cpus_per_worker)."""
    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0.0)), float(total.get("CPU", 0.0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus > 0 else 0.0
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise Pbs2pError("GPUs per worker must be >= 0 and CPUs per worker > 0, e.g. --gpus-per-worker 1")
    if gpus_per_worker > gpus:
        raise Pbs2pError(
            f"each worker asks for {gpus_per_worker:g} GPU(s) but the cluster has {gpus:g}; "
            f"use --gpus-per-worker 0 to run on CPUs"
        )
    if workers is None:
        workers = int(gpus // gpus_per_worker) if gpus_per_worker else int(cpus // cpus_per_worker)
        workers = max(1, workers)
    if workers < 1:
        raise Pbs2pError(f"--workers {workers}: a job needs at least 1 worker")
    if workers * cpus_per_worker > cpus or workers * gpus_per_worker > gpus + 1e-9 and gpus_per_worker:
        log.warning(
            "%d workers x (%g CPU, %g GPU) exceed the cluster's %g CPU, %g GPU: workers start as resources free up",
            workers,
            cpus_per_worker,
            gpus_per_worker,
            cpus,
            gpus,
        )
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    return Resources(workers, cpus_per_worker, gpus_per_worker, memory_per_worker, device)


def lost(exc: BaseException) -> bool:
    """Did this fail because a worker, its process or its node went away (not because of the job's data)?"""
    while isinstance(exc, RayTaskError) and not isinstance(exc, LOST):
        cause = getattr(exc, "cause", None)
        if cause is None or cause is exc:
            return False
        exc = cause
    return isinstance(exc, LOST)


def unwrap(exc: BaseException) -> BaseException:
    """The job's own error (a Pbs2pError raised in a worker) as the driver should show it."""
    cause: BaseException | None = exc
    while isinstance(cause, RayTaskError):
        cause = getattr(cause, "cause", None)
    if isinstance(cause, Pbs2pError):
        return Pbs2pError(str(cause.args[0]) if cause.args else str(cause))
    return exc
