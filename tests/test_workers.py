"""The one crash policy of every worker pool (maest_cli.io.workers), with real process deaths."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import time
from concurrent.futures import as_completed
from pathlib import Path

import pytest

from maest_cli.errors import MaestError
from maest_cli.io import workers
from maest_cli.io.workers import CrashPolicy, TaskDied, WorkerPool, WorkersDied, how_it_ended


def square(x: int) -> int:
    return x * x


def segfault_on(x: int, bad: int) -> int:
    """A task that crashes its process (a real segmentation fault) on `bad`."""
    if x == bad:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        ctypes.string_at(0)
    return x * x


def killed_once(x: int, marker: str) -> int:
    """Killed the first time it runs (the out-of-memory killer, say), fine the second."""
    if not Path(marker).exists():
        Path(marker).write_text("")
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 100


def always_exit(x: int) -> int:
    os._exit(7)


def raise_value_error(x: int) -> int:
    raise ValueError(f"bad input {x}")


def die_at_start() -> None:
    os._exit(3)


def test_a_task_that_kills_its_worker_fails_with_one_line_the_others_finish():
    with WorkerPool(2, role="decoder", doing="while decoding this file") as pool:
        futs = {pool.submit_task(segfault_on, (x, 3), label=f"f{x}.mp3"): x for x in range(8)}
        got, failed = {}, {}
        for fut in as_completed(futs, timeout=120):
            try:
                got[futs[fut]] = fut.result()
            except TaskDied as e:
                failed[futs[fut]] = e
    assert got == {x: x * x for x in range(8) if x != 3}
    (e,) = failed.values()
    assert list(failed) == [3] and e.label == "f3.mp3" and e.exit_code == 1
    assert e.reason == f"decoder process died (killed by SIGSEGV) while decoding this file, {workers.MAX_DEATHS_PER_TASK} times"
    assert str(e) == f"f3.mp3: {e.reason}" and "\n" not in str(e)
    assert not pool.broken or pool.policy.stop is None


def test_a_worker_killed_once_costs_nothing(tmp_path):
    with WorkerPool(1) as pool:
        futs = [pool.submit(killed_once, x, str(tmp_path / f"m{x}")) for x in range(3)]
        assert [f.result(timeout=120) for f in futs] == [100, 101, 102]
    assert all((tmp_path / f"m{x}").exists() for x in range(3))  # each did die once


def test_an_error_of_the_task_is_its_own_not_a_death():
    with WorkerPool(1) as pool:
        bad, good = pool.submit(raise_value_error, 1), pool.submit(square, 4)
        with pytest.raises(ValueError, match="bad input 1"):
            bad.result(timeout=120)
        assert good.result(timeout=120) == 16
    assert pool.policy.losses == 0 and not pool.policy.deaths


def test_tasks_that_kill_every_worker_stop_the_run_after_the_limit(monkeypatch):
    monkeypatch.setattr(workers, "MAX_LOSSES_IN_A_ROW", 3)
    pool = WorkerPool(1, role="render")
    futs = [pool.submit_task(always_exit, (x,), label=f"clip{x}") for x in range(6)]
    outcomes = []
    for f in futs:
        try:
            f.result(timeout=120)
        except (TaskDied, WorkersDied) as e:
            outcomes.append(e)
    assert [type(e) for e in outcomes[:3]] == [TaskDied] * 3  # each after its retry
    assert all(isinstance(e, WorkersDied) for e in outcomes[3:])
    stop = outcomes[3]
    assert isinstance(stop, MaestError) and stop.exit_code == 1
    assert str(stop) == ("render processes keep dying (exit code 7, 3 times in a row, the last on clip2): "
                         "is the machine short of memory or processes?")
    with pytest.raises(WorkersDied):
        pool.submit(square, 2)
    pool.shutdown()


def test_workers_that_die_before_any_task_stop_the_run_without_blaming_a_task(monkeypatch):
    monkeypatch.setattr(workers, "MAX_LOSSES_IN_A_ROW", 2)
    with WorkerPool(1, role="probe", initializer=die_at_start) as pool:
        fut = pool.submit(square, 3)
        with pytest.raises(WorkersDied, match=r"probe processes keep dying \(exit code 3, 2 times in a row, "
                                              r"outside any task\)"):
            fut.result(timeout=120)


def test_workers_zero_runs_in_this_process():
    pool = WorkerPool(0)
    assert pool.submit(square, 5).result() == 25
    with pytest.raises(ValueError):
        pool.submit(raise_value_error, 2).result()
    assert list(pool.map(square, range(4))) == [0, 1, 4, 9]
    pool.shutdown()


def test_idle_workers_exit_and_come_back_when_work_does():
    with WorkerPool(1, idle_timeout=0.2) as pool:
        assert pool.submit(square, 2).result(timeout=120) == 4
        time.sleep(1.0)  # the worker has left
        assert pool.submit(square, 3).result(timeout=120) == 9
    assert pool.policy.losses == 0


def test_the_policy_retries_once_then_fails_and_a_finished_task_resets_the_count(monkeypatch):
    monkeypatch.setattr(workers, "MAX_LOSSES_IN_A_ROW", 2)
    p = CrashPolicy("decoder", "while decoding this file")
    assert p.died(-9, "a") is None  # first death: run it again
    assert p.died(-9, "a", "a.mp3") == "decoder process died (killed by SIGKILL) while decoding this file, 2 times"
    p.finished("b")
    assert p.losses == 0 and p.stop is None
    assert p.died(1) is None and p.died(1) is None  # outside any task: losses, no task to fail
    assert isinstance(p.stop, WorkersDied) and "outside any task" in str(p.stop)
    assert how_it_ended(-11) == "killed by SIGSEGV" and how_it_ended(3) == "exit code 3"
