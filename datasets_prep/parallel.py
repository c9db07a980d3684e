"""An ordered, memory-bounded parallel map over a source stream that survives a worker being killed."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from itertools import islice
from typing import Callable, Iterable, Iterator

from datasets_prep.process import ProcessConfig, Skipped, init_worker, process_item

CHUNK = 4  # items per task: amortises the round trip without making the head of the queue wait long
CHUNKS_PER_WORKER = 3  # tasks queued per worker; bounds read-ahead (memory) while keeping workers busy


def exit_with_parent() -> None:
    """Wait for the parent to end, then end too: a parent killed by SIGKILL would otherwise leave idle workers."""
    multiprocessing.parent_process().join()
    os._exit(1)


def quiet_worker(config: ProcessConfig) -> None:
    """Workers leave Ctrl-C to the parent, which stops the pool and says how to resume, and die with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, daemon=True).start()
    init_worker(config)


def run_chunk(fn: Callable, chunk: list) -> list:
    return [fn(item) for item in chunk]


def new_pool(workers: int, config: ProcessConfig) -> ProcessPoolExecutor:
    """A spawn pool: fork after pyarrow and tqdm have started threads can deadlock."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=quiet_worker,
                               initargs=(config,))


def isolate(chunk: list, config: ProcessConfig, fn: Callable) -> list:
    """Re-run a chunk whose worker died, each item in a fresh process, so the one that kills it is named and skipped."""
    outputs = []
    for item in chunk:
        with new_pool(1, config) as solo:
            try:
                outputs.append(solo.submit(fn, item).result())
            except BrokenProcessPool:
                detail = "decoding this input killed its worker process (decoder crash or out of memory)"
                outputs.append(Skipped(item.key, item.path, "worker_crashed", detail))
    return outputs


def ordered(items: Iterable, config: ProcessConfig, workers: int, fn: Callable) -> Iterator:
    """fn over items in a pool, yielded in input order, with at most workers * CHUNKS_PER_WORKER chunks in flight."""
    source, pool = iter(items), new_pool(workers, config)
    pending: deque[tuple[list, Future]] = deque()
    try:
        while True:
            while len(pending) < workers * CHUNKS_PER_WORKER and (chunk := list(islice(source, CHUNK))):
                pending.append((chunk, pool.submit(run_chunk, fn, chunk)))
            if not pending:
                return
            chunk, future = pending.popleft()
            try:
                yield from future.result()
            except BrokenProcessPool:  # every pending future is lost with the pool: resubmit them to a new one
                pool.shutdown(wait=False, cancel_futures=True)
                yield from isolate(chunk, config, fn)
                pool = new_pool(workers, config)
                pending = deque((c, pool.submit(run_chunk, fn, c)) for c, _ in pending)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@contextmanager
def results(items: Iterable, config: ProcessConfig, workers: int, fn: Callable = process_item) -> Iterator[Iterator]:
    """fn (process_item) over `items` in input order, so the output is the same for any worker count.

    One worker runs in this process: no pickling, easy to debug, but a decoder crash there ends the run.
    """
    if workers <= 1:
        init_worker(config)
        yield map(fn, items)
    else:
        outputs = ordered(items, config, workers, fn)
        try:
            yield outputs
        finally:
            outputs.close()
