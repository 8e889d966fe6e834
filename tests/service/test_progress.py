"""A running job's progress as the dispatcher records it (service/dispatcher.py JobProgress) in a real SQLite job
store: the stage, blocks or bytes, and an ETA from the stage's own rate."""

from __future__ import annotations

import threading
from pathlib import Path

from pbs2p.service.dispatcher import JobProgress
from pbs2p.service.jobstore import JobStore


def test_download_progress_has_bytes_and_an_eta_then_blocks_have_theirs(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        job, _ = store.create_job("t", "org/name@v1", {})
        claimed = store.claim("owner")
        assert claimed is not None and claimed.id == job.id
        progress = JobProgress(store, job.id, "owner", threading.Event())
        mib = 2**20
        progress("downloading", 0, 300 * mib)
        progress("downloading", 300 * mib, 300 * mib)  # the end of a stage is always written
        got = store.get(job.id)
        assert got is not None
        p = got.progress
        assert p["stage"] == "downloading" and p["bytes_done"] == p["bytes_total"] == 300 * mib, p
        assert p["percent"] == 100.0 and p["eta_seconds"] == 0.0, p
        progress("compress", 0, 30)
        progress("compress", 30, 30)
        got = store.get(job.id)
        assert got is not None
        p = got.progress
        assert p["stage"] == "compress" and (p["block"], p["blocks"]) == (30, 30), p
        assert "bytes_done" not in p and p["eta_seconds"] == 0.0, p  # the ETA restarted with the stage
    finally:
        store.close()
