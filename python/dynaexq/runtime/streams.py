"""Two ordered work queues of a device runtime — the compute stream and a copy stream —
and events between them: `CudaStreams` on a GPU, `HostStreams` their model on the CPU.

A runtime queues work with `run(stream, fn)`, marks a point with `record(stream)` and
makes a stream wait for a point of the other with `wait(stream, event)`; the host waits
only through `synchronize(event)`. On CUDA `run` executes `fn` at once with the stream
current (its kernels and copies are queued there). `HostStreams` keeps the work queued
instead and runs a stream only as far as its waits allow, with one stream lagging as far
behind as its order lets it: an ordering the runtime forgot to state then shows up as
wrong bytes read (a copy overwriting a slot before its last reader ran, or a reader
running before its copy), not as a test that passes because the CPU runs everything in
program order.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch

Stream = Literal["compute", "copy"]


class Streams(Protocol):
    """What a device runtime asks of its streams (see the module docstring)."""

    def run(self, stream: Stream, fn: Callable[[], Any]) -> None: ...
    def record(self, stream: Stream, timing: bool = False) -> Any: ...
    def wait(self, stream: Stream, event: Any) -> None: ...
    def synchronize(self, event: Any) -> None: ...
    def done(self, event: Any) -> bool: ...
    def elapsed(self, start: Any, end: Any) -> float: ...
    def handoff(self) -> None: ...
    def drain(self) -> None: ...


class CudaStreams:
    """The current stream of `device` computes; one stream of its own copies."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.copy = torch.cuda.Stream(self.device)

    def _stream(self, stream: Stream) -> torch.cuda.Stream:
        return self.copy if stream == "copy" else torch.cuda.current_stream(self.device)

    def run(self, stream: Stream, fn: Callable[[], Any]) -> None:
        if stream == "compute":
            fn()
            return
        with torch.cuda.stream(self.copy):
            fn()

    def record(self, stream: Stream, timing: bool = False) -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=timing)
        ev.record(self._stream(stream))
        return ev

    def wait(self, stream: Stream, event: torch.cuda.Event) -> None:
        self._stream(stream).wait_event(event)

    def synchronize(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def done(self, event: torch.cuda.Event) -> bool:
        return event.query()

    def elapsed(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1e3

    def handoff(self) -> None:
        """The layer's output is read by the model's next kernels on the compute stream:
        ordered there, nothing to do."""

    def drain(self) -> None:
        torch.cuda.synchronize(self.device)


class HostEvent:
    """A point in a `HostStreams` queue: fired when the stream's work before it ran."""

    __slots__ = ("stream", "fired", "time")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.fired = False
        self.time = 0.0


class HostStreams:
    """CUDA's stream semantics on the CPU, for tests. `lag` is the stream that runs only
    when something depends on it ("compute": copies race ahead of the readers of the
    slots they overwrite; "copy": readers race ahead of the copies they need; None:
    both run as soon as they can). `hold`: `handoff` leaves the compute stream queued
    (a test driving the runtime layer by layer reads outputs only after `drain`); else
    it drains, as the model's host code reads a layer's output at once.

    `host_waits` counts the times the host had to wait for queued work."""

    def __init__(self, lag: Stream | None = "compute", hold: bool = False) -> None:
        self.queues: dict[Stream, deque[tuple[str, Any]]] = {"compute": deque(), "copy": deque()}
        self.lag, self.hold = lag, hold
        self.host_waits = 0
        self._running: set[Stream] = set()

    def _put(self, stream: Stream, item: tuple[str, Any]) -> None:
        self.queues[stream].append(item)
        for s in ("copy", "compute"):
            if s != self.lag:
                self._advance(s)  # type: ignore[arg-type]

    def run(self, stream: Stream, fn: Callable[[], Any]) -> None:
        self._put(stream, ("run", fn))

    def record(self, stream: Stream, timing: bool = False) -> HostEvent:
        ev = HostEvent(stream)
        self._put(stream, ("record", ev))
        return ev

    def wait(self, stream: Stream, event: HostEvent) -> None:
        self._put(stream, ("wait", event))

    def synchronize(self, event: HostEvent) -> None:
        if not event.fired:
            self.host_waits += 1
            self._advance(event.stream, until=event)

    def done(self, event: HostEvent) -> bool:
        return event.fired

    def elapsed(self, start: HostEvent, end: HostEvent) -> float:
        return max(0.0, end.time - start.time)

    def handoff(self) -> None:
        if not self.hold:
            self.drain()

    def drain(self) -> None:
        for s in ("copy", "compute", "copy"):
            self._advance(s)  # type: ignore[arg-type]

    def _advance(self, stream: Stream, until: HostEvent | None = None) -> None:
        """Run `stream`'s queue in order until `until` fired (or it is empty); a wait on
        an event of the other stream runs that stream up to the event first."""
        if stream in self._running:
            if until is not None and not until.fired:
                raise RuntimeError(f"the {stream} stream waits on itself (a deadlock on CUDA)")
            return
        self._running.add(stream)
        try:
            q = self.queues[stream]
            while q and not (until is not None and until.fired):
                kind, arg = q[0]
                if kind == "wait" and not arg.fired:
                    self._advance(arg.stream, until=arg)
                    if not arg.fired:
                        raise RuntimeError(f"the {stream} stream waits on an event never reached")
                q.popleft()
                if kind == "run":
                    arg()
                elif kind == "record":
                    arg.fired, arg.time = True, time.perf_counter()
        finally:
            self._running.discard(stream)
