"""Worker processes and the one crash policy of every pool in maest-cli.

A worker process may die on a task (a decoder segfaulting on a hostile file, the out-of-memory
killer, a stray kill). The policy, decided here once (`CrashPolicy`) for the extract decoders
(audio/decoders.py, a streaming pool of its own) and for `WorkerPool` (prepare-mels, the demo
corpus, the findings probes):
- a task whose worker died is run again in a fresh worker (the death may have come from
  outside); when a worker dies on it MAX_DEATHS_PER_TASK times, the task fails with one line
  naming it and the signal, and the run goes on;
- a worker that dies before its task started (at start-up, say) costs no task;
- MAX_LOSSES_IN_A_ROW losses (tasks failed so, or deaths outside any task) with no task finishing
  in between stop the run with WorkersDied: then the machine is at fault (memory, process
  limits, a broken install), not the inputs.

`WorkerPool` is a concurrent.futures Executor: each worker holds one task at a time, fed over
its own pipe, and posts the task it runs in shared memory, so a death is always blamed on the
task that was running. A manager thread feeds the workers and settles the futures. Workers are
spawned (a fresh interpreter: nothing inherited, and no forkserver shared with the extract
decoders, whose preload is theirs); a pool lives for a whole run, so that start costs once.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import os
import pickle
import queue
import signal
import threading
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from multiprocessing.connection import wait

from maest_cli.errors import MaestError

# A task on which a worker died this many times fails (fewer: it runs again in a fresh worker).
MAX_DEATHS_PER_TASK = 2
# Losses (a task failed by deaths, or a death outside any task) in a row, with no task finishing
# in between, that stop the run.
MAX_LOSSES_IN_A_ROW = 5


class WorkersDied(MaestError, ChildProcessError):
    """Worker processes keep dying: the run stops (what finished or failed before is kept)."""


class TaskDied(MaestError):
    """A task whose worker died MAX_DEATHS_PER_TASK times; `reason` is the one-line why."""

    def __init__(self, reason: str, label: str | None = None):
        super().__init__(f"{label}: {reason}" if label else reason)
        self.reason, self.label = reason, label


def how_it_ended(exitcode: int | None) -> str:
    """'killed by SIGSEGV' or 'exit code 3'."""
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


class CrashPolicy:
    """Counts the deaths of one pool's workers and rules on each (see the module docstring).

    The limits are read when a death is ruled on, so a test can lower them."""

    def __init__(self, role: str, doing: str = "while running this task"):
        self.role, self.doing = role, doing  # "decoder", "while decoding this file"
        self.deaths: collections.Counter = collections.Counter()  # task -> deaths while it ran
        self.losses = 0  # in a row
        self.stop: WorkersDied | None = None  # set when the run must stop

    def died(self, exitcode: int | None, task=None, label: str | None = None, doing: str | None = None) -> str | None:
        """A worker died while running `task` (None: outside any task). Returns None when the
        task is to run again, else the reason it fails; sets `stop` at the limit of losses."""
        how = how_it_ended(exitcode)
        reason = None
        if task is not None:
            self.deaths[task] += 1
            if self.deaths[task] < MAX_DEATHS_PER_TASK:
                return None
            reason = f"{self.role} process died ({how}) {doing or self.doing}, {self.deaths.pop(task)} times"
        self.losses += 1
        if self.losses >= MAX_LOSSES_IN_A_ROW and self.stop is None:
            where = f"the last on {label}" if label else "outside any task"
            self.stop = WorkersDied(f"{self.role} processes keep dying ({how}, {self.losses} times in a row, "
                                    f"{where}): is the machine short of memory or processes?")
        return reason

    def finished(self, task=None) -> None:
        """A task ended (with a result or an error of its own): the workers are sound."""
        self.losses = 0
        self.deaths.pop(task, None)


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so a killed run leaves no orphans. (Linux ties
    this to the thread that started the process: for WorkerPool its manager thread, which
    outlives the workers.)"""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# ------------------------------------------------------------------ the map-style pool

def _worker_main(conn, current, initializer, initargs, idle_timeout) -> None:
    """A worker process: task id + pickled (fn, args, kwargs) in, pickled (id, ok, value) out;
    empty bytes: exit. `current` holds the id of the task it runs, for the blame if it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    die_with_parent()
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            if idle_timeout is not None and not conn.poll(idle_timeout):
                return  # idle for long: the pool starts another when there is work
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the main process is gone
            return
        if data == b"":
            return
        tid = int.from_bytes(data[:8], "little")
        current.value = tid
        try:
            fn, args, kwargs = pickle.loads(data[8:])
            out = (tid, True, fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - the task's error, delivered to its future
            out = (tid, False, e)
        current.value = -1
        try:
            payload = pickle.dumps(out)
            if not out[1]:
                pickle.loads(payload)  # an error must also unpickle in the main process
        except Exception as e:  # noqa: BLE001 - an unpicklable result or error
            payload = pickle.dumps((tid, False, RuntimeError(f"{type(out[2]).__name__}: {out[2]} "
                                                             f"(cannot send it back: {e})")))
        try:
            conn.send_bytes(payload)
        except OSError:
            return


@dataclass
class _Task:
    id: int
    payload: bytes
    future: Future
    label: str | None
    doing: str | None
    started: bool = False


def _drop(t: _Task, error: BaseException | None) -> None:
    """Settle the future of a task that will not run (again): cancelled, or failed with `error`."""
    if t.future.done() or (error is None and t.future.cancel()):
        return
    if t.started or t.future.set_running_or_notify_cancel():
        t.future.set_exception(error or RuntimeError("the worker pool was shut down"))


@dataclass
class _Worker:
    proc: object
    conn: object
    current: object  # shared int: the id of the task it runs, -1 between tasks
    task: _Task | None = None


class WorkerPool(Executor):
    """`workers` processes running tasks under the crash policy; `workers=0`: in this process.

    Futures of tasks that died fail with TaskDied; when the policy stops the run, every future
    not yet settled fails with WorkersDied and so does every later submit. `idle_timeout`:
    seconds after which an idle worker exits (another starts when work comes)."""

    def __init__(self, workers: int, *, role: str = "worker", doing: str = "while running this task",
                 initializer=None, initargs: tuple = (), idle_timeout: float | None = None):
        self.workers = max(0, int(workers))
        self.policy = CrashPolicy(role, doing)
        self._init = (initializer, initargs, idle_timeout)
        self._ids = itertools.count()
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()
        self._queue: collections.deque[_Task] = collections.deque()
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()  # submit against the manager closing the pool
        self._closed = False  # no task is taken any more
        self._stopping = self._cancel = self._kill = False
        self._thread = None
        if self.workers:
            self._ctx = multiprocessing.get_context("spawn")
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            self._thread = threading.Thread(target=self._manage, name=f"maest-{role}-pool", daemon=True)
            self._thread.start()

    @property
    def broken(self) -> bool:
        return self.policy.stop is not None or self._stopping

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self.submit_task(fn, args, kwargs)

    def submit_task(self, fn, args: tuple = (), kwargs: dict | None = None, *, label: str | None = None,
                    doing: str | None = None) -> Future:
        """Run fn(*args, **kwargs); `label` names the task in failures ("b1.mp3"), `doing` says
        what it was doing ("while rendering this clip"; default: the pool's)."""
        if self.policy.stop is not None:
            raise self.policy.stop
        if self._stopping:
            raise RuntimeError("submit to a worker pool that was shut down")
        fut: Future = Future()
        if not self.workers:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args, **(kwargs or {})))
                except Exception as e:  # noqa: BLE001 - delivered as a worker's would be
                    fut.set_exception(e)
            return fut
        tid = next(self._ids)
        payload = tid.to_bytes(8, "little") + pickle.dumps((fn, args, kwargs or {}))
        with self._lock:
            if self._closed:
                raise self.policy.stop or RuntimeError("submit to a worker pool that was shut down")
            self._incoming.put(_Task(tid, payload, fut, label, doing))
        self._wake()
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, kill_workers: bool = False) -> None:
        """Finish the queued tasks (or cancel them) and stop the workers; `kill_workers`: at once."""
        if not self.workers:
            return
        if cancel_futures or kill_workers:
            for t in self._drain_incoming():
                _drop(t, None)
        self._kill = self._kill or kill_workers
        self._cancel = cancel_futures or kill_workers
        self._stopping = True
        self._wake()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # -------------------------------------------------------------- the manager thread

    def _wake(self) -> None:
        with self._lock, contextlib.suppress(OSError):  # full: it is awake anyway
            if self._wake_w is not None:
                os.write(self._wake_w, b"x")

    def _drain_incoming(self, close: bool = False) -> list[_Task]:
        got = []
        with self._lock:
            self._closed = self._closed or close
            with contextlib.suppress(queue.Empty):
                while True:
                    got.append(self._incoming.get_nowait())
        return got

    def _manage(self) -> None:
        try:
            self._start_workers(self.workers)  # at once: their imports overlap the caller's work
            while True:
                self._queue.extend(self._drain_incoming())
                if self._cancel:
                    for t in self._queue:
                        _drop(t, None)
                    self._queue.clear()
                if self.policy.stop is not None or self._kill:
                    self._abort(self.policy.stop)
                    return
                busy = sum(w.task is not None for w in self._pool)
                self._start_workers(min(self.workers, len(self._queue) + busy) - len(self._pool))
                self._dispatch()
                if self._stopping and not self._queue and not any(w.task for w in self._pool):
                    self._queue.extend(self._drain_incoming(close=True))
                    if not self._queue:
                        break
                    continue
                self._step()
            self._close_workers()
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave futures hanging
            self._abort(e if isinstance(e, Exception) else RuntimeError(str(e)))
        finally:
            with self._lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_w = None

    def _start_workers(self, n: int) -> None:
        initializer, initargs, idle = self._init
        for _ in range(max(0, n)):
            ours, theirs = self._ctx.Pipe(duplex=True)
            current = self._ctx.RawValue("q", -1)
            proc = self._ctx.Process(target=_worker_main, args=(theirs, current, initializer, initargs, idle),
                                     name=self._thread.name, daemon=True)
            proc.start()
            theirs.close()
            self._pool.append(_Worker(proc, ours, current))

    def _dispatch(self) -> None:
        for w in self._pool:
            while w.task is None and self._queue:
                t = self._queue.popleft()
                if not t.started:
                    if not t.future.set_running_or_notify_cancel():
                        continue  # cancelled while queued
                    t.started = True
                w.task = t
                with contextlib.suppress(OSError):  # it died: its sentinel says so, and the task goes back
                    w.conn.send_bytes(t.payload)

    def _step(self) -> None:
        """Wait for a result, a death or a wake-up, and settle what came."""
        by_conn = {w.conn: w for w in self._pool}
        by_sentinel = {w.proc.sentinel: w for w in self._pool}
        ready = set(wait([self._wake_r, *by_conn, *by_sentinel]))
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        for conn in ready & by_conn.keys():
            self._receive(by_conn[conn])
        for s in ready & by_sentinel.keys():
            w = by_sentinel[s]
            if w in self._pool:
                while w.conn.poll() and self._receive(w):
                    pass
                if w in self._pool:
                    self._reap(w)

    def _receive(self, w: _Worker) -> bool:
        try:
            tid, ok, value = pickle.loads(w.conn.recv_bytes())
        except (EOFError, OSError):
            self._reap(w)
            return False
        except Exception as e:  # noqa: BLE001 - a result that does not unpickle here
            tid, ok, value = (w.task.id if w.task else -1), False, e
        t = w.task
        if t is None or t.id != tid:  # not the task it holds: nothing to settle
            return True
        w.task = None
        self.policy.finished(t.id)
        if ok:
            t.future.set_result(value)
        else:
            t.future.set_exception(value)
        return True

    def _reap(self, w: _Worker) -> None:
        """A worker's process ended: blame the task it ran, if it had started one."""
        self._pool.remove(w)
        w.conn.close()
        w.proc.join(timeout=5)
        if w.proc.is_alive():  # its pipe broke, but it lives on: it cannot be trusted
            w.proc.kill()
            w.proc.join(timeout=5)
        code, t = w.proc.exitcode, w.task
        if t is None:  # between tasks: exit code 0 is an idle worker leaving
            if code != 0:
                self.policy.died(code)
            return
        if w.current.value != t.id:  # it never started the task: a death outside any task
            self._queue.appendleft(t)
            self.policy.died(code)
            return
        reason = self.policy.died(code, t.id, t.label, t.doing)
        if reason is None:
            self._queue.appendleft(t)  # a fresh worker runs it again
        else:
            t.future.set_exception(TaskDied(reason, t.label))

    def _abort(self, error: BaseException | None) -> None:
        """Stop at once: kill the workers, fail (or cancel) every unsettled future."""
        for w in self._pool:
            with contextlib.suppress(Exception):
                w.proc.kill()
        for w in self._pool:
            with contextlib.suppress(Exception):
                w.proc.join(timeout=5)
                w.conn.close()
        tasks = [w.task for w in self._pool if w.task is not None] + list(self._queue)
        tasks += self._drain_incoming(close=True)
        self._pool.clear()
        self._queue.clear()
        self._stopping = True
        for t in tasks:
            _drop(t, error)

    def _close_workers(self) -> None:
        for w in self._pool:
            with contextlib.suppress(OSError):
                w.conn.send_bytes(b"")
        for w in self._pool:
            w.proc.join(timeout=10)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=5)
            w.conn.close()
        self._pool.clear()
