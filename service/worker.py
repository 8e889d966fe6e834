"""`pbs2p worker`: the job driver in a process of its own, and the supervisor `pbs2p serve` runs it under.

The worker claims queued jobs from the job store and drives them (the dispatcher: Ray coordinator, heartbeats,
evaluation, upload, the lifecycle's periodic task) and delivers the webhooks waiting in the store's outbox (those
of the API's changes too: the API sends none). It shares
nothing with the API but the job store and the storage: a cancel or a DELETE is a state change in the store, which
the job reads at its next progress report. Killing the API leaves the jobs running; killing the worker leaves its
jobs to the next worker (it re-queues them once their lease ran out, or at once for a dead process on its host)
and they resume from their last checkpointed block.

`WorkerProcess` is the supervisor: `pbs2p serve` runs the API and one worker child, restarted (after a pause)
whenever it exits without being asked to. The child gets its own process group, so that the whole of a dead
worker (its local Ray included) is killed before the next starts, and it watches its supervisor: once that is gone
(a killed `serve`) it takes no new job and exits when its running jobs have ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

from prometheus_client import start_http_server

from pbs2p.workers.storage import storage_from_url

from .dispatcher import Dispatcher
from .jobstore import JobStore
from .settings import Settings

log = logging.getLogger(__name__)
RESTART_S = (1.0, 30.0)  # the supervisor's pause before restarting a worker: doubles per quick failure, capped
HEALTHY_S = 60.0  # a worker that ran this long before exiting is restarted after the shortest pause


def run_worker(settings: Settings, supervisor_pid: int | None = None) -> int:
    """Drive jobs until SIGTERM/SIGINT (running jobs go back to the queue), until the dispatcher dies (exit 1: Ray
    did not start), or, with `supervisor_pid`, once that process is gone and no job of this worker runs."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.db_url)
    storage = storage_from_url(settings.artifacts_url, settings.s3)
    dispatcher = Dispatcher(settings, store, storage)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("worker: signal %d, stopping (running jobs go back to the queue)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, settings.host, registry=dispatcher.metrics.registry)
    dispatcher.start()
    log.info("pbs2p worker %s (database %s, Ray %s)", dispatcher.owner, settings.db_url.split("@")[-1],
             settings.ray_address)  # fmt: skip
    code = 0
    try:
        while not stop.wait(0.5):
            if not dispatcher.alive():
                log.error("worker: the dispatcher stopped (see above); exiting")
                code = 1
                break
            if supervisor_pid is not None and not dispatcher.draining.is_set() and os.getppid() != supervisor_pid:
                log.warning("worker: its supervisor (pid %d) is gone; finishing the running jobs, then exiting",
                            supervisor_pid)  # fmt: skip
                dispatcher.draining.set()
            if dispatcher.draining.is_set() and not dispatcher.busy():
                log.info("worker: no job left to finish; exiting")
                break
    finally:
        dispatcher.stop()
        store.close()
    return code


class WorkerProcess:
    """`pbs2p worker` as a child of this process, restarted whenever it exits unasked; the API's `dispatcher`
    (started and stopped with the app; `alive` for /healthz)."""

    metrics = None  # the job metrics live in the worker (PBS2P_WORKER_METRICS_PORT)

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.restarts = 0

    def start(self) -> None:
        self.thread = threading.Thread(target=self._supervise, name="pbs2p-worker-supervisor", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "pbs2p.service.cli", "worker", "--supervisor", str(os.getpid())]
        # stdout and stderr are this process's (the service log); a process group of its own (see the module)
        return subprocess.Popen(cmd, env=self.env, start_new_session=True)

    def _supervise(self) -> None:
        pause = RESTART_S[0]
        while not self.stopping.is_set():
            started = time.monotonic()
            self.proc = self._spawn()
            log.info("worker started (pid %d)", self.proc.pid)
            code = self.proc.wait()
            _kill_group(self.proc.pid)  # what is left of it (its local Ray) goes before the next one starts
            if self.stopping.is_set():
                return
            pause = RESTART_S[0] if time.monotonic() - started > HEALTHY_S else min(pause * 2, RESTART_S[1])
            self.restarts += 1
            log.warning("worker (pid %d) exited with %s; restarting it in %.0f s", self.proc.pid, code, pause)
            self.stopping.wait(pause)

    def stop(self, timeout: float = 90.0) -> None:
        """SIGTERM the worker (its running jobs go back to the queue), wait for it, then kill what is left."""
        self.stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker (pid %d) did not stop within %.0f s; killing it", proc.pid, timeout)
        if proc is not None:
            _kill_group(proc.pid)
        if self.thread is not None:
            self.thread.join(5)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
