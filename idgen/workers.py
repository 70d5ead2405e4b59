"""Run one function over many items in worker processes, each of which sets itself up once (loads
its pipeline or face models) and then takes items until none are left: locally (spawned
processes, one per CPU slot or GPU) or on a Ray cluster (one long-lived actor per slot).

The work is made by ``setup()``, a picklable callable (a module-level function or class, or a
``functools.partial`` of one) run once in each worker; it returns the function applied to each
item. Results come back as they finish, in any order, paired with their item. A worker that dies
(killed, out of memory) takes its items with it: they run again on a new worker, up to
``retries`` times, then come back as ``WorkerDied``. Nothing here knows what the work is.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from typing import Any

from .errors import IDGenError


@dataclass(frozen=True)
class Engine:
    """Where the work runs: ``workers`` local processes (1: in this process), or a Ray cluster when
    ``ray`` is set (``"local"`` starts one on this machine; else the cluster's address). ``gpus``
    are the CUDA devices to spread over (one worker each); ``threads`` per worker (default: the
    CPU cores shared out)."""

    workers: int = 1
    ray: str | None = None
    gpus: int = 0
    threads: int | None = None
    retries: int = 2

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise IDGenError(f"--workers {self.workers}: give 1 or more")
        if self.gpus and self.workers > self.gpus:
            raise IDGenError(f"--workers {self.workers} for {self.gpus} GPU(s): one worker per GPU, so at most "
                             f"--workers {self.gpus}")

    @property
    def threads_per_worker(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)


@dataclass(frozen=True)
class WorkerDied:
    """The result of an item whose worker died each time it ran."""

    attempts: int

    def __str__(self) -> str:
        return f"its worker died {self.attempts} time(s) (killed, or out of memory)"


def _as_is(work: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return work


def given(work: Callable[[Any], Any]) -> Callable[[], Callable[[Any], Any]]:
    """The setup of work that needs none of its own (``work`` itself, pickled to each worker)."""
    return partial(_as_is, work)


def run(setup: Callable[[], Callable[[Any], Any]], items: Sequence[Any], engine: Engine) -> Iterator[tuple[Any, Any]]:
    """``(item, result)`` for every item, as each finishes; an item whose work raised has a
    ``Failed`` result (the other items go on), one whose worker kept dying a ``WorkerDied``."""
    if not items:
        return iter(())
    if engine.ray is not None:
        return _run_ray(setup, items, engine)
    if engine.workers == 1 and not engine.gpus:
        return _run_here(setup, items, engine)
    return _run_processes(setup, items, engine)


@dataclass(frozen=True)
class Failed:
    """The result of an item whose work raised: the error in one line (idgen's errors as they
    are, others with their type), which crosses process boundaries where the exception may not."""

    error: str

    def __str__(self) -> str:
        return self.error


def _guarded(work: Callable[[Any], Any], item: Any) -> Any:
    try:
        return work(item)
    except IDGenError as err:  # the item's failure, reported with it; the worker takes the next one
        return Failed(str(err))
    except Exception as err:
        return Failed(f"{type(err).__name__}: {err}")


def _set_threads(threads: int) -> None:
    """One worker's share of the CPU: torch's threads (where torch is loaded) and OpenMP's."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def _run_here(setup: Callable[[], Callable[[Any], Any]], items: Sequence[Any], engine: Engine) -> Iterator[tuple[Any, Any]]:
    work = setup()
    _set_threads(engine.threads_per_worker)
    for item in items:
        yield item, _guarded(work, item)


_WORK: Callable[[Any], Any] | None = None  # the function a worker process applies, made once by its setup


def _start_worker(setup: Callable[[], Callable[[Any], Any]], threads: int, slots: Any) -> None:
    """A worker process starts: it takes a GPU slot (before anything touches CUDA), then sets up."""
    global _WORK
    try:
        slot = slots.get_nowait()
    except queue.Empty:
        slot = None
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
    _set_threads(threads)
    _WORK = setup()
    _set_threads(threads)  # setup may have loaded torch


def _work_item(item: Any) -> Any:
    assert _WORK is not None, "a worker takes items only after its setup"
    return _guarded(_WORK, item)


def _run_processes(setup: Callable[[], Callable[[Any], Any]], items: Sequence[Any],
                   engine: Engine) -> Iterator[tuple[Any, Any]]:
    """Spawned processes (a fork would copy a parent's threads and CUDA state), one item in flight
    per worker. When a worker dies the pool is replaced and the items that were in flight are run
    again one at a time, so that only the item that kills its worker is counted against it."""
    context = multiprocessing.get_context("spawn")
    attempts = dict.fromkeys(range(len(items)), 0)
    pending: list[int] = list(range(len(items)))[::-1]
    suspects: list[int] = []
    while pending or suspects:
        slots = context.Queue()
        for gpu in range(engine.gpus):
            slots.put(gpu)
        with ProcessPoolExecutor(engine.workers, mp_context=context, initializer=_start_worker,
                                 initargs=(setup, engine.threads_per_worker, slots)) as pool:
            running: dict[Future, int] = {}
            broken = False
            while not broken and (pending or suspects or running):
                alone = bool(suspects)
                while (alone and not running) or (not alone and pending and len(running) < engine.workers):
                    i = suspects.pop() if alone else pending.pop()
                    running[pool.submit(_work_item, items[i])] = i
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    i = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken = True
                        attempts[i] += alone  # run alone, it was the one that died
                        if attempts[i] > engine.retries:
                            yield items[i], WorkerDied(attempts[i])
                        else:
                            suspects.append(i)
                        continue
                    yield items[i], result
            if broken:
                for future, i in running.items():  # in flight beside the one that died: suspects too
                    future.cancel()
                    suspects.append(i)
                pool.shutdown(wait=False, cancel_futures=True)


def _run_ray(setup: Callable[[], Callable[[Any], Any]], items: Sequence[Any], engine: Engine) -> Iterator[tuple[Any, Any]]:
    """One actor per slot, each set up once; Ray restarts a dead actor and retries its items."""
    try:
        import ray  # lazy: optional dependency (idgen[ray])
    except ImportError:
        raise IDGenError('--ray needs Ray: pip install "idgen[ray]"') from None
    started = not ray.is_initialized()
    if started:
        address = None if engine.ray == "local" else engine.ray
        try:
            ray.init(address=address, num_cpus=engine.workers * engine.threads_per_worker if address is None else None,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        except ConnectionError as err:
            raise IDGenError(f"no Ray cluster at {engine.ray} ({err}): start one (ray start --head) or pass "
                             "--ray local") from None
    try:
        actor = ray.remote(num_cpus=engine.threads_per_worker, num_gpus=1 if engine.gpus else 0,
                           max_restarts=engine.retries, max_task_retries=engine.retries)(_RayWorker)
        actors = [actor.remote(setup, engine.threads_per_worker) for _ in range(engine.workers)]
        pool = ray.util.ActorPool(actors)
        for i, item in enumerate(items):
            pool.submit(lambda worker, pair: worker.work.remote(*pair), (i, item))
        while pool.has_next():
            try:
                i, result = pool.get_next_unordered()
            except ray.exceptions.RayActorError:  # an actor died past its restarts
                raise IDGenError("a Ray worker died more often than it may restart: run again to resume") from None
            yield items[i], result
    finally:
        if started:
            ray.shutdown()


class _RayWorker:
    """A Ray actor: set up once, then work items."""

    def __init__(self, setup: Callable[[], Callable[[Any], Any]], threads: int):
        _set_threads(threads)
        self._work = setup()
        _set_threads(threads)

    def work(self, index: int, item: Any) -> tuple[int, Any]:
        return index, _guarded(self._work, item)


__all__ = ["Engine", "Failed", "WorkerDied", "given", "run"]
