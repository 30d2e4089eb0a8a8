"""Background jobs for long snapshot operations (import, flatten): a thread each, with progress.

The store methods are synchronous and thread-safe; a job runs one in a thread and records its progress
(0..1), result or error so `bootctl` can draw a progress bar by polling. Jobs live in memory: a daemon
killed mid-job leaves only a temp file, which the start-up fsck removes.
"""
from __future__ import annotations

import builtins
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import SnapshotError

log = logging.getLogger("bootd.snapshots")


class JobCancelled(SnapshotError):
    status = 409


@dataclass
class Job:
    id: int
    kind: str
    target: str
    actor: str
    state: str = "running"          # running | done | failed
    progress: float = 0.0
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    error_status: int | None = None
    cancelled: bool = False

    def set_progress(self, fraction: float) -> None:
        if self.cancelled:
            raise JobCancelled(f"{self.kind} of {self.target} was cancelled (bootd is stopping)")
        self.progress = max(self.progress, min(1.0, float(fraction)))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "target": self.target, "actor": self.actor, "state": self.state,
                "progress": round(self.progress, 4), "started_at": self.started_at,
                "finished_at": self.finished_at, "result": self.result, "error": self.error,
                "error_status": self.error_status}


class JobManager:
    def __init__(self, keep_finished: int = 100):
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self.keep_finished = keep_finished

    def start(self, kind: str, target: str, actor: str,
              fn: Callable[[Callable[[float], None]], dict[str, Any]]) -> Job:
        """Run fn(progress) in a thread; fn returns the result dict or raises."""
        job = Job(id=next(self._ids), kind=kind, target=target, actor=actor)

        def run() -> None:
            try:
                job.result = fn(job.set_progress)
                job.progress = 1.0
                job.state = "done"
            except SnapshotError as exc:
                job.error, job.error_status, job.state = str(exc), exc.status, "failed"
            except Exception as exc:  # reported to the admin, never lost in a thread
                job.error, job.error_status, job.state = f"{type(exc).__name__}: {exc}", 500, "failed"
            finally:
                job.finished_at = time.time()
                if job.state == "failed":
                    log.error("snapshot %s of %s failed: %s", job.kind, job.target, job.error)
                else:
                    log.info("snapshot %s of %s done in %.1f s", job.kind, job.target,
                             job.finished_at - job.started_at)

        t = threading.Thread(target=run, name=f"snapshot-{kind}-{job.id}", daemon=True)
        with self._lock:
            self._jobs[job.id] = job
            self._threads[job.id] = t
            self._trim()
        t.start()
        return job

    def _trim(self) -> None:
        done = sorted((j for j in self._jobs.values() if j.state != "running"), key=lambda j: j.id)
        for j in done[:max(0, len(done) - self.keep_finished)]:
            self._jobs.pop(j.id, None)
            self._threads.pop(j.id, None)

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(int(job_id))

    def list(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.id)

    def wait(self, job_id: int, timeout: float | None = None) -> Job:
        t = self._threads.get(int(job_id))
        if t is not None:
            t.join(timeout)
        return self._jobs[int(job_id)]

    def running(self) -> builtins.list[Job]:
        return [j for j in self._jobs.values() if j.state == "running"]

    def cancel_all(self, timeout: float = 3.0) -> None:
        """Ask running jobs to stop at their next progress report and wait a little for them."""
        for j in self.running():
            j.cancelled = True
        deadline = time.monotonic() + timeout
        for t in list(self._threads.values()):
            t.join(max(0.0, deadline - time.monotonic()))
