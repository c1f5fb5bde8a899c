"""A small thread pool for the copy engine, compare and dd: what they use of
concurrent.futures, which costs some 10 ms to import (it brings logging)."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable


class Task:
    """One submitted call; ``result`` waits for it and returns its value
    or raises its exception."""

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self._fn, self._args = fn, args
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as e:  # handed to whoever waits for the result
            self._error = e
        finally:
            self._fn = self._args = None  # type: ignore[assignment]
            self._done.set()

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class Workers:
    """Up to ``count`` threads taking submitted calls in order; leaving the
    ``with`` block waits for every call submitted."""

    def __init__(self, count: int) -> None:
        self._count = max(1, count)
        self._threads: list[threading.Thread] = []
        self._queue: deque[Task | None] = deque()
        self._cond = threading.Condition()
        self._idle = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Task:
        task = Task(fn, args)
        with self._cond:
            self._queue.append(task)
            if self._idle:
                self._cond.notify()
            elif len(self._threads) < self._count:
                t = threading.Thread(target=self._loop, name="qimg-worker", daemon=True)
                self._threads.append(t)
                t.start()
        return task

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                task = self._queue.popleft()
            if task is None:
                return
            task._run()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._queue.extend([None] * len(self._threads))
            self._cond.notify_all()
        for t in self._threads:
            t.join()
