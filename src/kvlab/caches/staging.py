"""Bringing offloaded rows onto the compute device: landing buffers, side streams, events.

A `Mover` owns, per lane ("kv" for cached K/V rows, "act" for activations), two landing
buffers on the device that fetches alternate between, so the next layer can land while the
current one is being used. On CUDA every lane has its own side stream: a fetch is queued
there after the compute stream's earlier work (the landing buffer's previous reader, and any
device-to-host writes of the rows being read), and the compute stream waits on the fetch's
event only when it needs the rows. Rows that are not in pinned memory (a memory-mapped file)
go through a pinned bounce buffer, whose previous copy is waited for on the host first.

On a CPU device, device == host: a fetch is a plain copy into the landing buffer done at once,
in the same order, through the same buffers, so the CPU path runs the same bookkeeping that
CUDA does, only without concurrency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SLOTS = 2


@dataclass
class Landing:
    """Rows fetched into a landing buffer; `event` is set on CUDA until the compute stream waits."""

    rows: torch.Tensor
    event: object | None = None


class Mover:
    """Fetches host rows (token-major) into device landing buffers, lane by lane."""

    def __init__(self, device: torch.device | str, lanes: tuple[str, ...] = ("kv",)) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.lanes = lanes
        self.bytes_in = 0  # bytes brought to the device (host -> device on CUDA)
        self._slot = SLOTS - 1
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._bounces: dict[tuple[str, int], torch.Tensor] = {}
        self._bounce_done: dict[tuple[str, int], object] = {}
        self._streams = {lane: torch.cuda.Stream(self.device) for lane in lanes} if self.cuda else {}

    def next_slot(self) -> int:
        """The landing buffer for the next layer's fetch: never the one the current layer uses."""
        self._slot = (self._slot + 1) % SLOTS
        return self._slot

    def fetch(self, lane: str, slot: int, rows: torch.Tensor) -> Landing:
        """Start bringing host `rows` to the device into `lane`'s buffer `slot`."""
        if lane not in self.lanes:
            raise ValueError(f"unknown lane {lane!r}")
        target = self._buffer(lane, slot, rows)
        self.bytes_in += rows.numel() * rows.element_size()
        if not self.cuda:
            target.copy_(rows)
            return Landing(target)
        stream = self._streams[lane]
        # The buffer's previous reader and the writes of these rows were queued on the compute stream.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            if rows.is_pinned():
                target.copy_(rows, non_blocking=True)
            else:
                bounce = self._bounce(lane, slot, rows)
                bounce.copy_(rows)  # host copy (page-cache or disk reads for a mapped file)
                target.copy_(bounce, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
                self._bounce_done[(lane, slot)] = done
            event = torch.cuda.Event()
            event.record(stream)
        return Landing(target, event)

    def ready(self, landing: Landing) -> torch.Tensor:
        """The landed rows, once the compute stream is ordered after their copy."""
        if landing.event is not None:
            torch.cuda.current_stream(self.device).wait_event(landing.event)
            landing.event = None
        return landing.rows

    @property
    def nbytes(self) -> int:
        """Device bytes held by the landing buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _buffer(self, lane: str, slot: int, rows: torch.Tensor) -> torch.Tensor:
        key = (lane, slot)
        buf = self._buffers.get(key)
        numel = rows.numel()
        if buf is None or buf.dtype != rows.dtype or buf.numel() < numel:
            grown = max(numel, int(buf.numel() * 1.5) if buf is not None and buf.dtype == rows.dtype else 0)
            buf = torch.empty(grown, dtype=rows.dtype, device=self.device)
            self._buffers[key] = buf
        return buf[:numel].view(rows.shape)

    def _bounce(self, lane: str, slot: int, rows: torch.Tensor) -> torch.Tensor:
        key = (lane, slot)
        done = self._bounce_done.pop(key, None)
        if done is not None:
            done.synchronize()  # the previous copy out of this bounce buffer has finished
        buf = self._bounces.get(key)
        numel = rows.numel()
        if buf is None or buf.dtype != rows.dtype or buf.numel() < numel:
            buf = torch.empty(max(numel, int(buf.numel() * 1.5) if buf is not None else 0),
                              dtype=rows.dtype, pin_memory=True)
            self._bounces[key] = buf
        return buf[:numel].view(rows.shape)
