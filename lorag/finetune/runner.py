"""The runner: works the persistent job queue with worker processes, beside the serving loop.

It lives in the server's event loop but does no training there: each running job is a
`lorag.finetune.worker` process (threads capped), at most `fine_tuning.max_concurrent` at a
time, oldest queued job first. What a worker's exit means is decided here:

- trained: the server checks and registers the adapter (`finish`, the service's);
- the data is at fault: the job fails with the worker's error, naming the line;
- stopped on request: paused (or back in the queue when the server is stopping);
- anything else (a crash, `kill -9`): the job goes back to the queue and resumes from its
  last checkpoint, until `fine_tuning.max_attempts` crashes, when it fails with the reason.

Processes sharing a state directory (`lorag serve --workers N`) each have a runner, but only the
one holding the jobs leadership (lorag.state.leader) works the queue; the others only check for it.
On becoming leader (at start, or when the leader went) a runner first recovers what the previous
one left: jobs marked running have lost their worker (workers die with their server), so they are
resumed or, if training had finished, finished. Cancel and pause reach a worker from any process:
the reason goes on the job's record (`stop_requested`) and the worker is signalled by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from lorag.finetune.jobs import WORKER_LOG, JobStore, add_event, read_worker
from lorag.finetune.settings import FineTuningSettings
from lorag.finetune.worker import EXIT_BAD_INPUT, EXIT_STOPPED
from lorag.logging import get_logger
from lorag.state.leader import LeaderKeeper, Leadership

log = get_logger("lorag.finetune")
TICK_S = 1.0
STOP_GRACE_S = 20.0  # a stopping server gives each worker this long to checkpoint and exit
STALE_GRACE_S = 10.0  # a new leader waits this long for a killed worker of the previous one to be gone
WORKER_MODULE = "lorag.finetune.worker"
ASKED = ("cancel", "pause")  # the stops a caller asks for (the record keeps them); "shutdown" is the server's
LOG_TAIL_CHARS = 600

Hook = Callable[[dict[str, Any]], Awaitable[None]]


class JobRunner:
    def __init__(self, settings: FineTuningSettings, store: JobStore, validate: Hook, finish: Hook,
                 fail: Callable[[str, dict[str, Any]], Awaitable[None]], leadership: Leadership) -> None:
        self.settings = settings
        self.store = store
        self._validate = validate  # validating_files -> queued (or failed)
        self._finish = finish  # a trained job -> canary, registration, succeeded (or failed)
        self._fail = fail
        self.workers: dict[str, asyncio.subprocess.Process] = {}
        self._stopping: dict[str, str] = {}  # job id -> "cancel" | "pause" | "shutdown"
        self._watchers: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.keeper = LeaderKeeper(leadership, "jobs", TICK_S)  # checked by the loop, every tick
        self._leading = False  # holds the leadership and has recovered: works the queue
        self._check: asyncio.Future[bool] | None = None  # the lock's latest check (runs in a thread)

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        await self._lead()  # a leader recovers before the server serves
        self._task = asyncio.create_task(self._loop())

    @property
    def leading(self) -> bool:
        return self._leading

    async def stop(self) -> None:
        """Checkpoint and stop every worker; their jobs resume when a server (or another worker) leads."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for job_id in list(self.workers):
            self.signal(job_id, "shutdown")
        deadline = time.monotonic() + STOP_GRACE_S
        while self.workers and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for job_id, process in list(self.workers.items()):
            process.kill()
            log.warning("worker_killed_at_shutdown", job=job_id)
        while self.workers and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.1)
        if self._check is not None:  # a check still in its thread may yet take the lock: release after it
            with contextlib.suppress(Exception):
                await self._check
        # Only now: a follower taking over earlier would find these jobs running and count a crash.
        await self.keeper.stop()
        self._leading = False

    def poke(self) -> None:
        """Look at the queue now (a job was made, cancelled, resumed)."""
        if self._wake is not None:
            self._wake.set()

    def signal(self, job_id: str, why: str) -> bool:
        """Stop a job's worker: 'cancel' kills it, 'pause' and 'shutdown' let it checkpoint first.

        The worker may be another process's (this one does not lead, or no longer does): a cancel
        or pause goes on the job's record, where the leader reads it when the worker exits, and
        the worker is signalled by the pid on the record.
        """
        number = signal.SIGKILL if why == "cancel" else signal.SIGTERM
        record = self._ask(job_id, why)
        process = self.workers.get(job_id)
        if process is not None and process.returncode is None:
            self._stopping[job_id] = why
            process.send_signal(number)
            return True
        if record is None or why not in ASKED:
            return False
        sent = _signal_worker(record.get("worker_pid"), self.store.dir_of(job_id), number)
        log.info("fine_tuning_worker_signalled", job=job_id, pid=record.get("worker_pid"), why=why, reached=sent)
        return sent

    def _ask(self, job_id: str, why: str) -> dict[str, Any] | None:
        """Put a cancel or pause on the record of a job that has a worker; the record, or None."""
        if why not in ASKED:
            return None
        record = self.store.get(job_id)
        if not record.get("worker_pid"):
            return None
        return self.store.update(job_id, stop_requested=why)

    # -- leadership ------------------------------------------------------------------------

    async def _lead(self) -> bool:
        """Whether this process works the queue now; a new leader first recovers what the last one left."""
        self._check = asyncio.ensure_future(self.keeper.check())
        held = await asyncio.shield(self._check)  # a stop() meanwhile waits for it (see stop)
        if held and not self._leading:
            await self._recover()
            self._leading = True
            log.info("fine_tuning_runner_leading", pid=os.getpid())
        elif not held and self._leading:
            self._leading = False
            self._abandon()
        return self._leading

    def _abandon(self) -> None:
        """Leadership lost while alive (a lock that can be lost): this process's workers checkpoint
        and stop, their jobs back in the queue, so none trains beside the new leader's."""
        log.warning("fine_tuning_leadership_lost", pid=os.getpid(), workers=len(self.workers))
        for job_id in list(self.workers):
            self.signal(job_id, "shutdown")

    # -- the queue -------------------------------------------------------------------------

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            try:
                if await self._lead():  # a follower only checks
                    await self._tick()
            except Exception:  # one bad job must not stop the queue
                log.exception("fine_tuning_tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            self._wake.clear()

    async def _tick(self) -> None:
        for record in await asyncio.to_thread(self.store.all):  # every job's record: file reads
            if record["status"] == "validating_files":
                await self._validate(record)
            elif record["id"] in self.workers and record.get("stop_requested") in ASKED \
                    and record["id"] not in self._stopping:
                self.signal(record["id"], record["stop_requested"])  # asked on a host that cannot reach the worker
            elif record["status"] == "running" and record["id"] in self.workers:
                self._refresh(record)
        free = self.settings.max_concurrent - len(self.workers)
        queued = [r for r in await asyncio.to_thread(self.store.all) if r["status"] == "queued"]  # validated now too
        for record in queued[:max(free, 0)]:
            await self._spawn(record)

    def _refresh(self, record: dict[str, Any]) -> None:
        """Carry the worker's estimate of when it finishes onto the job."""
        estimate = read_worker(self.store.dir_of(record["id"])).get("estimated_finish")
        if estimate != record.get("estimated_finish"):
            self.store.update(record["id"], estimated_finish=estimate)

    async def _spawn(self, record: dict[str, Any]) -> None:
        job_id = record["id"]
        job_dir = self.store.dir_of(job_id)
        threads = str(self.settings.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "TOKENIZERS_PARALLELISM": "false", "LORAG_WORKER_PARENT": str(os.getpid())}
        with (job_dir / WORKER_LOG).open("ab") as output:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", WORKER_MODULE, str(job_dir), stdout=output,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
        self.workers[job_id] = process
        first = not record.get("started_at")
        self.store.update(job_id, status="running", worker_pid=process.pid, stop_requested=None,
                          started_at=record.get("started_at") or int(time.time()))
        add_event(job_dir, "Fine-tuning job started." if first else "Training worker started again; it resumes from the last checkpoint.")
        log.info("fine_tuning_worker_started", job=job_id, pid=process.pid, threads=self.settings.threads)
        watcher = asyncio.create_task(self._watch(job_id, process))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, job_id: str, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        why = self._stopping.pop(job_id, None)
        try:
            await self._ended(job_id, code, why)
        except Exception:
            log.exception("fine_tuning_job_end_failed", job=job_id)
        finally:
            self.workers.pop(job_id, None)
            self.poke()

    async def _ended(self, job_id: str, code: int, why: str | None) -> None:
        record = self.store.get(job_id)
        job_dir = self.store.dir_of(job_id)
        outcome = read_worker(job_dir)
        why = _reason(why, record.get("stop_requested"), code)
        log.info("fine_tuning_worker_exited", job=job_id, code=code, outcome=outcome.get("outcome"), why=why)
        if record["status"] in ("cancelled", "failed", "succeeded"):
            return  # cancelled while it ran: the job says so already
        if code == 0 and outcome.get("outcome") == "trained":
            self.store.update(job_id, worker_pid=None)
            await self._finish(self.store.get(job_id))
        elif code == EXIT_BAD_INPUT and outcome.get("error"):
            await self._fail(job_id, outcome["error"])
        elif why == "pause":  # stopped by SIGTERM: at a checkpoint (EXIT_STOPPED) or before its first step
            self._paused(job_id)
        elif why == "shutdown":
            self.store.update(job_id, status="queued", worker_pid=None, estimated_finish=None)
            add_event(job_dir, "The server stopped; the job goes on from its last checkpoint when it starts again.")
        else:
            await self._crashed(record, f"the training worker exited with code {code}")

    def _paused(self, job_id: str) -> None:
        self.store.update(job_id, status="paused", worker_pid=None, estimated_finish=None)
        add_event(self.store.dir_of(job_id), "Fine-tuning job paused.")

    async def _crashed(self, record: dict[str, Any], what: str) -> None:
        """Back to the queue (resume from the last checkpoint) or, after too many crashes, failed."""
        job_id = record["id"]
        job_dir = self.store.dir_of(job_id)
        crashes = int(record.get("crashes", 0)) + 1
        step = read_worker(job_dir).get("step", 0)
        if crashes >= self.settings.max_attempts:
            tail = _tail(job_dir / WORKER_LOG)
            await self._fail(job_id, {"code": "worker_failed", "param": None, "message": (
                f"Training stopped {crashes} times ({what}); the job gives up. Last output: {tail}")})
            return
        self.store.update(job_id, status="queued", crashes=crashes, worker_pid=None, estimated_finish=None)
        add_event(job_dir, f"The job was interrupted ({what}); it resumes from its last checkpoint "
                           f"(step {step} reached; attempt {crashes + 1} of {self.settings.max_attempts}).",
                  level="warn")

    # -- recovery --------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Jobs marked running whose worker went with the previous leader (or server): finished,
        paused if that was asked, else back in the queue."""
        for record in await asyncio.to_thread(self.store.all):
            if record["status"] != "running" or record["id"] in self.workers:
                continue
            job_dir = self.store.dir_of(record["id"])
            await asyncio.to_thread(_kill_stale, record.get("worker_pid"), job_dir)
            if read_worker(job_dir).get("outcome") == "trained":
                await self._finish(record)  # trained; the server stopped before it was registered
            elif record.get("stop_requested") == "pause":
                self._paused(record["id"])
            else:
                await self._crashed(record, "the server stopped while it trained")


def _reason(own: str | None, asked: str | None, code: int) -> str | None:
    """Why a worker stopped: this process's signal; else a cancel or pause asked through another
    process (on the record; a pause wins over this server's shutdown). A worker that stopped at a
    checkpoint on request (EXIT_STOPPED) with no reason left was asked by someone: a pause."""
    if own in (None, "shutdown") and asked in ASKED:
        return asked
    if own is None and code == EXIT_STOPPED:
        return "pause"
    return own


def _is_worker(pid: int, job_dir: Path) -> bool:
    """Whether `pid` is this job's training worker: a pid from a record may belong to anything by now."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False  # gone (a zombie reads as no arguments: gone too)
    return WORKER_MODULE in args and str(job_dir) in args


def _signal_worker(pid: int | None, job_dir: Path, number: int) -> bool:
    """Signal this job's worker by pid (any process's), never an unrelated process."""
    if not pid or not _is_worker(pid, job_dir):
        return False
    try:
        os.kill(pid, number)
    except OSError:
        return False
    return True


def _kill_stale(pid: int | None, job_dir: Path) -> None:
    """A worker of a previous leader still running (its parent-death signal is late, or never came):
    killed, and gone, before the job gets a new worker, so two never train one job."""
    if not _signal_worker(pid, job_dir, signal.SIGKILL):
        return
    assert pid is not None
    deadline = time.monotonic() + STALE_GRACE_S
    while _is_worker(pid, job_dir):
        if time.monotonic() > deadline:
            log.warning("stale_worker_still_running", pid=pid, job=job_dir.name)
            return
        time.sleep(0.05)


def _tail(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "(no output)"
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-LOG_TAIL_CHARS:] or "(no output)"
