"""Progress on stderr: one tqdm bar per stage of a job, here or followed over HTTP."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

_UNITS = {"eval": "window", "evaluate": "model", "downloading": "B", "tasks": "request"}
_FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
_AFTER_COMPRESS = {"evaluate", "upload", "done"}


class Progress:
    """A job's progress callback (stage, done, total): a bar per stage of several steps (blocks, windows), closed
    when the stage changes; one-step stages (prepare, capture, upload) show none; a download counts bytes."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.stage = enabled, ""
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage or (self.bar is not None and self.bar.total != total):
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
    """The progress of a job followed over HTTP (each version of the job, as the API returns it): one bar for the
    whole job, with the job's state and stage after it: the bytes of the model's download while it downloads,
    then its blocks; kept when the state changes (a job that goes back to the queue and resumes moves the same
    bar), closed when the job is final. State changes are printed above the bar."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.counting = ""  # what the bar counts: "downloading" (bytes) or "compress" (blocks)
        self.state = ""

    def __call__(self, job: dict[str, Any]) -> None:
        p = job.get("progress") or {}
        if job["state"] != self.state:
            self.state = job["state"]
            tqdm.write(f"job {job['id']}: {self.state}", file=sys.stderr)
        stage = p.get("stage")
        done, total = (
            (p.get("block"), p.get("blocks")) if stage == "compress" else (p.get("bytes_done"), p.get("bytes_total"))
        )
        if stage in ("downloading", "compress") and total and stage != self.counting:
            if self.bar is None:
                self.bar = tqdm(total=total, desc=stage, file=sys.stderr)
            self.bar.reset(total=total)
            self.bar.set_description(stage)
            self.bar.unit, self.bar.unit_scale = ("B", True) if stage == "downloading" else ("block", False)
            self.counting = stage
        if self.bar is not None:
            if stage == self.counting and done is not None:
                self.bar.update(done - self.bar.n)
            elif self.counting == "compress" and (stage in _AFTER_COMPRESS or self.state == "SUCCEEDED"):
                self.bar.update(self.bar.total - self.bar.n)  # the last block's event may be folded into the next
            self.bar.set_postfix_str(f"{self.state} {stage or ''}".strip())
        if self.state in _FINAL:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
