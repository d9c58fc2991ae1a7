"""Sums kept on the compute device and read by the host without waiting on the decode path.

A device executor leaves what the controller and the telemetry need on the device: the
routed mass of every (layer, expert) between controller steps, and what each tier
served in a step. `DeviceSums` adds into a device tensor; `snapshot()` queues a copy into
page-locked host memory on the compute stream and zeroes the sums behind it (so nothing
is counted twice or lost), and `take()` returns the copy — at once when it has landed
(`ready()`), else after waiting for it. Taking the copy one step later than it was
queued, as the runtime does on a GPU, means the host never waits: by then the
step that followed has been sampled.
"""

from __future__ import annotations

import numpy as np
import torch


class DeviceSums:
    """A device tensor of sums with one asynchronous host copy in flight at a time."""

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
    ) -> None:
        dev = torch.device(device)
        cuda = dev.type == "cuda"
        self.sum = torch.zeros(shape, dtype=dtype, device=dev)
        self._host = torch.zeros(shape, dtype=dtype, pin_memory=cuda)
        self._copied = torch.cuda.Event() if cuda else None
        self.pending = False

    def snapshot(self) -> None:
        """Queue the copy of the sums so far and restart them from zero."""
        if self.pending:
            raise RuntimeError("take() the previous snapshot before the next one")
        self._host.copy_(self.sum, non_blocking=True)
        self.sum.zero_()  # ordered after the copy on the same stream
        if self._copied is not None:
            self._copied.record()
        self.pending = True

    def ready(self) -> bool:
        """Whether the queued copy has landed (always, on the CPU)."""
        return self.pending and (self._copied is None or self._copied.query())

    def take(self) -> np.ndarray:
        """The sums of the last snapshot (waits for its copy if it has not landed)."""
        if not self.pending:
            raise RuntimeError("no snapshot to take")
        if self._copied is not None and not self._copied.query():
            self._copied.synchronize()
        self.pending = False
        return self._host.numpy().copy()
