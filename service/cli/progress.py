"""Progress on stderr: one tqdm bar per stage of a job, here or followed over HTTP."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

_UNITS = {"eval": "window", "evaluate": "model", "downloading": "B"}


class Progress:
    """A job's progress callback (stage, done, total): a bar per stage of several steps (blocks, windows), closed
    when the stage changes; one-step stages (prepare, capture, upload) show none; a download counts bytes."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.stage = enabled, ""
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.stage = stage
        if total <= 1:
            return
        if self.bar is None:
            unit = _UNITS.get(stage, "block")
            self.bar = tqdm(total=total, desc=stage, unit=unit, unit_scale=unit == "B", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class JobBar:
    """The progress of a job followed over HTTP (each version of the job, as the API returns it)."""

    def __init__(self) -> None:
        self.bar = Progress()
        self.state = ""

    def __call__(self, job: dict[str, Any]) -> None:
        p = job.get("progress") or {}
        if job["state"] != self.state:
            self.bar.close()
            self.state = job["state"]
            print(f"job {job['id']}: {self.state}", file=sys.stderr)
        if p.get("stage") == "compress" and p.get("blocks"):
            self.bar("compress", p["block"], p["blocks"])
        elif p.get("stage") == "downloading" and p.get("bytes_total"):
            self.bar("downloading", p["bytes_done"], p["bytes_total"])
