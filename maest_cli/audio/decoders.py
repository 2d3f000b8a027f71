"""Decoding in parallel with the model: worker processes turn files into segments.

Each worker decodes whole files (decode, resample, mel, cut: `segments.py`) and
sends their segments to the main process over its own pipe, a few segments ahead at most, so
decoding overlaps the model and memory stays bounded (back-pressure). One pipe per worker,
not one shared queue: a worker that dies mid-message (a decoder crash on a bad file) can
neither corrupt the others' messages nor leave a shared lock held. The main process knows
which files each worker holds, and each worker posts the file it is decoding in a shared
integer (not on the pipe: a worker runs ahead of what the main process has read, so the last
file *seen* is not the one it was decoding). When a worker dies, that file is the culprit;
the worker's other unfinished files (a finished one may still sit in its outbox) are decoded
again by a fresh worker. The culprit too gets a second chance, alone on a worker, since a
crash may come from outside (the OOM killer, a stray kill); how many deaths a file and a run
may cost is the one crash policy of every pool (io/workers.py: CrashPolicy). Workers die with
their parent (PR_SET_PDEATHSIG, and a closed pipe), so a killed run leaves no orphans.

The protocol, per file: ("seg", fid, index, start, frames)..., then ("done", fid,
n_segments, n_samples) or ("error", fid, stage, reason). ("retry", fid) means: forget what
came of this file, it will be sent again from its first segment.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import resource
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from maest_cli.audio.decode import AudioError
from maest_cli.audio.segments import DecodeStats, iter_file_segments
from maest_cli.io.workers import CrashPolicy, die_with_parent

# Segments a worker may decode ahead of what the main process has read (~0.7 MB each at 30 s).
DECODE_AHEAD = 4
# A worker that holds files but has sent nothing for this long is stuck (a decoder looping on a
# hostile file, a hung network mount): it is killed and its current file fails.
STALL_SECONDS = 300.0


def file_messages(fid: int, path: str, segment_frames: int, hop: int) -> Iterator[tuple]:
    """The protocol messages of one file (see the module docstring); never raises."""
    stats = DecodeStats()
    try:
        for seg in iter_file_segments(path, segment_frames, hop, stats):
            yield ("seg", fid, seg.index, seg.start, seg.frames)
        yield ("done", fid, stats.n_segments, stats.n_samples)
    except AudioError as e:
        yield ("error", fid, e.stage, e.reason)
    except MemoryError:
        yield ("error", fid, "decode", "out of memory while decoding")
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's, not the run's
        yield ("error", fid, "decode", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")


def _decoder_main(wid: int, conn, segment_frames: int, hop: int, ahead: int, current) -> None:
    """A decoder process: tasks (fid, path) or None come in on `conn`, messages go out on it.

    A sender thread drains a small local queue into the pipe, so decoding runs up to `ahead`
    messages ahead while the main process is busy with the model. `current` (shared memory)
    holds the fid being decoded, -1 between files: the main process reads it if this dies.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    die_with_parent()
    import torch

    torch.set_num_threads(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # libmpg123 & co. print resync chatter on fd 2; errors come as messages
    outbox: queue.Queue = queue.Queue(maxsize=ahead)

    def sender() -> None:
        while True:
            msg = outbox.get()
            if msg is None:
                return
            try:
                conn.send(msg)
            except OSError:  # the main process is gone
                os._exit(0)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the main process is gone
            os._exit(0)
        if task is None:
            break
        fid, path = task
        current.value = fid
        for msg in file_messages(fid, path, segment_frames, hop):
            outbox.put(msg)
        current.value = -1
    outbox.put(("exit", wid, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    outbox.put(None)
    thread.join()


def _mp_context():
    import multiprocessing as mp

    # forkserver: workers fork from a clean process that has imported this module once, so
    # they start fast and never inherit the main process's threads (torch/OpenMP).
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def start_early() -> None:
    """Boot the forkserver (it imports torch: seconds) while the caller loads the model."""
    ctx = _mp_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class InlineDecoder:
    """--workers 0: decode in the main process, one file at a time (debugging, tiny jobs)."""

    def __init__(self, files: list[tuple[int, str]], segment_frames: int, hop: int):
        self._gen = (m for fid, path in files for m in file_messages(fid, path, segment_frames, hop))
        self.peak_rss_mb = 0.0
        self.exhausted = False  # every message has been handed out

    def get(self, block: bool = True):
        msg = next(self._gen, None)
        self.exhausted = msg is None
        return msg

    def close(self, abort: bool = False) -> None:
        self._gen.close()


@dataclass
class _Worker:
    proc: object
    conn: object
    current: object  # shared int: the fid it is decoding, -1 between files
    assigned: collections.deque  # fids sent to it and not finished, in order
    last_message: float = 0.0
    stalled: bool = False


class DecoderPool:
    """N decoder processes fed through their own pipes (see the module docstring).

    `worker_main` is the decoder process's entry point (tests pass one that dies at once).
    """

    PREFETCH = 2  # files queued per worker, so it never waits for its next task

    def __init__(self, files: list[tuple[int, str]], n_workers: int, segment_frames: int, hop: int,
                 ahead: int = DECODE_AHEAD, stall_seconds: float = STALL_SECONDS, worker_main=_decoder_main):
        self._ctx = _mp_context()
        self.stall_seconds = stall_seconds
        self._args = (segment_frames, hop, ahead)
        self._worker_main = worker_main
        self._paths = dict(files)
        self._pending = collections.deque(fid for fid, _ in files)
        self._inbox: collections.deque = collections.deque()
        self._workers: dict[int, _Worker] = {}
        self._next_wid = 0
        self._policy = CrashPolicy("decoder", "while decoding this file")
        self._suspects: set[int] = set()  # fids a worker died on: decoded alone, to be sure of the blame
        self._closing = False
        self.peak_rss_mb = 0.0
        for _ in range(max(1, min(n_workers, len(files)))):
            self._start_worker()

    @property
    def exhausted(self) -> bool:
        """Nothing left to hand out and no one left to produce it (and no stop to report)."""
        return not self._workers and not self._pending and not self._inbox and self._policy.stop is None

    def _start_worker(self) -> None:
        wid = self._next_wid
        self._next_wid += 1
        ours, theirs = self._ctx.Pipe(duplex=True)
        current = self._ctx.RawValue("q", -1)
        proc = self._ctx.Process(target=self._worker_main, args=(wid, theirs, *self._args, current),
                                 name=f"maest-decoder-{wid}", daemon=True)
        proc.start()
        theirs.close()
        self._workers[wid] = _Worker(proc, ours, current, collections.deque(), time.monotonic())
        self._top_up(wid)

    def _next_for(self, w: _Worker) -> int | None:
        """The next pending file for this worker: a suspect only to an idle worker, and then alone."""
        if any(f in self._suspects for f in w.assigned):
            return None
        if not w.assigned:
            return self._pending[0] if self._pending else None
        return next((f for f in self._pending if f not in self._suspects), None)

    def _top_up(self, wid: int) -> None:
        w = self._workers[wid]
        try:
            while len(w.assigned) < self.PREFETCH:
                fid = self._next_for(w)
                if fid is None:
                    break
                w.conn.send((fid, self._paths[fid]))
                self._pending.remove(fid)  # after the send: a dead worker loses no file
                w.assigned.append(fid)
            if not self._pending and not w.assigned:
                w.conn.send(None)  # nothing left for it: let it exit
        except OSError:
            pass  # it died; _reap will notice

    def _receive(self, timeout: float) -> None:
        """Read one message from each worker that has one (waiting up to `timeout`)."""
        from multiprocessing.connection import wait

        conns = {w.conn: wid for wid, w in self._workers.items()}
        if not conns:
            return
        for conn in wait(list(conns), timeout):
            wid = conns[conn]
            try:
                msg = conn.recv()
            except Exception:  # noqa: BLE001 - EOF: it exited, or died (maybe mid-message)
                self._reap(wid)
                continue
            self._workers[wid].last_message = time.monotonic()
            kind = msg[0]
            if kind == "exit":
                self.peak_rss_mb = max(self.peak_rss_mb, msg[2])
                continue
            if kind in ("done", "error"):
                w = self._workers[wid]
                with contextlib.suppress(ValueError):
                    w.assigned.remove(msg[1])
                self._suspects.discard(msg[1])
                self._policy.finished(msg[1])
                self._top_up(wid)
            self._inbox.append(msg)

    def get(self, block: bool = True):
        """Next message, or None when none came (within a short wait if `block`). Raises
        WorkersDied once the crash policy stopped the run and what came before is handed out."""
        if not self._inbox and self._policy.stop is not None:
            raise self._policy.stop
        if not self._inbox:
            self._receive(0.5 if block else 0.0)
            if not self._inbox:
                self._kill_stalled()
        return self._inbox.popleft() if self._inbox else None

    def _kill_stalled(self) -> None:
        """Nothing is waiting to be read, so a silent worker is not blocked on us: it is stuck."""
        now = time.monotonic()
        for w in self._workers.values():
            if w.assigned and not w.stalled and now - w.last_message > self.stall_seconds:
                w.stalled = True
                w.proc.kill()  # its pipe closes: _receive reaps it

    def _reap(self, wid: int) -> None:
        """A worker's pipe closed: it finished, or died. If it died, the file it was decoding
        is the culprit (failed on its second death, else decoded again alone); its other
        unfinished files are decoded again by a replacement (see the module docstring)."""
        w = self._workers.pop(wid)
        w.conn.close()
        w.proc.join(timeout=5)
        if w.proc.is_alive():  # its pipe broke, but it lives on: it cannot be trusted
            w.proc.kill()
            w.proc.join(timeout=5)
        if (not w.assigned and w.proc.exitcode == 0) or self._closing:
            return  # finished normally, or we are shutting down
        culprit = w.current.value if w.current.value in w.assigned else None
        if culprit is None and w.stalled and w.assigned:
            culprit = w.assigned[0]
        again = [f for f in w.assigned if f != culprit]
        if culprit is None:
            self._policy.died(w.proc.exitcode)
        elif w.stalled:
            self._inbox.append(("error", culprit, "decode", f"decoding stalled (no output for "
                                f"{self.stall_seconds:.0f} s); the decoder was killed"))
        else:
            reason = self._policy.died(w.proc.exitcode, culprit, self._paths[culprit])
            if reason is not None:
                self._inbox.append(("error", culprit, "decode", reason))
                self._suspects.discard(culprit)
            else:
                self._suspects.add(culprit)
                again.insert(0, culprit)
        for fid in again:  # what came of them so far is void: they start again from scratch
            self._inbox.append(("retry", fid))
        self._pending.extendleft(reversed(again))
        if self._pending and self._policy.stop is None:
            self._start_worker()

    def close(self, abort: bool = False) -> None:
        """Let workers finish (or kill them with abort=True) and collect their peak memory."""
        self._closing = True
        if not abort:
            for w in self._workers.values():
                with contextlib.suppress(OSError):
                    w.conn.send(None)
            deadline = time.monotonic() + 10
            while self._workers and time.monotonic() < deadline:
                self._receive(0.2)
        for w in self._workers.values():
            if w.proc.is_alive():
                w.proc.kill()
            w.proc.join(timeout=5)
            w.conn.close()
        self._workers.clear()
