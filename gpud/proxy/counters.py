"""Counts every proxy worker shares: requests in flight per replica, last request time per model, and the
balancer's tie-break cursor per model (SPEC §9, §12, §14).

One block of shared memory (an anonymous memfd mapped by the daemon and by every worker), laid out as rows
that each have a single writer, so no lock is needed: worker w only ever writes row w of the in-flight and
last-request tables, and a reader sums (or takes the max over) the rows. An aligned 8-byte store is atomic on
the machines gpud runs on, so a reader sees each cell either before or after a write, never torn. The cursor
is written by whichever worker breaks a tie; a lost update only changes which of several equally loaded
replicas goes next.

Slots are handed out by the daemon (gpud.proxy.table): a replica slot per running replica, a model slot per
model. A replica slot is reused only once every row's count for it is back to 0.
"""

from __future__ import annotations

import mmap
import os
import struct

from gpud.config import MAX_PROXY_WORKERS

MAX_WORKERS = MAX_PROXY_WORKERS  # SPEC §14: a row per worker
REPLICA_SLOTS = 8192
MODEL_SLOTS = 2048

_HEADER = struct.Struct("=4sIII")  # magic, workers, replica slots, model slots
_MAGIC = b"GPUc"
_CELL = 8
_HEADER_SIZE = 2 * _CELL  # the cells start after the header, aligned
assert _HEADER.size <= _HEADER_SIZE


def _size(workers: int, replica_slots: int, model_slots: int) -> int:
    cells = workers * replica_slots + workers * model_slots + model_slots
    return _HEADER_SIZE + _CELL * cells


class Counters:
    """A view of the shared block. `row` is the writer's worker index (the daemon reads only)."""

    def __init__(self, buffer: mmap.mmap | bytearray, row: int | None = None) -> None:
        magic, workers, replica_slots, model_slots = _HEADER.unpack_from(buffer, 0)
        if magic != _MAGIC:
            raise ValueError("not a gpud counter block")
        if row is not None and not 0 <= row < workers:
            raise ValueError(f"worker row {row} outside 0..{workers - 1}")
        self.workers, self.replica_slots, self.model_slots = workers, replica_slots, model_slots
        self.row = row
        self._buffer = buffer
        view = memoryview(buffer)[_HEADER_SIZE:]
        inflight_cells = workers * replica_slots
        last_cells = workers * model_slots
        self._inflight = view[: inflight_cells * _CELL].cast("q")
        self._last = view[inflight_cells * _CELL : (inflight_cells + last_cells) * _CELL].cast("d")
        self._cursor = view[(inflight_cells + last_cells) * _CELL :].cast("q")
        self._mine = row * replica_slots if row is not None else -1
        self._mine_models = row * model_slots if row is not None else -1

    # ---- making and opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, workers: int = MAX_WORKERS, replica_slots: int = REPLICA_SLOTS,
               model_slots: int = MODEL_SLOTS) -> tuple[Counters, int]:
        """A new zeroed block in a memfd; returns the daemon's (read-only) view and the fd to pass on."""
        size = _size(workers, replica_slots, model_slots)
        fd = os.memfd_create("gpud-counters", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        buffer = mmap.mmap(fd, size)
        _HEADER.pack_into(buffer, 0, _MAGIC, workers, replica_slots, model_slots)
        return cls(buffer), fd

    @classmethod
    def attach(cls, fd: int, row: int) -> Counters:
        """The block behind `fd` (inherited from the daemon), writing as worker `row`."""
        return cls(mmap.mmap(fd, os.fstat(fd).st_size), row)

    @classmethod
    def local(cls, replica_slots: int = 1024, model_slots: int = 256) -> Counters:
        """A private block for one in-process proxy (tests, tools): worker row 0."""
        buffer = bytearray(_size(1, replica_slots, model_slots))
        _HEADER.pack_into(buffer, 0, _MAGIC, 1, replica_slots, model_slots)
        return cls(buffer, 0)

    # ---- writers (a worker's own row) -------------------------------------------------------------------
    def started(self, slot: int) -> None:
        self._inflight[self._mine + slot] += 1

    def finished(self, slot: int) -> None:
        self._inflight[self._mine + slot] -= 1

    def requested(self, model_slot: int, now: float) -> None:
        """A request to the model began or ended now (the idle clock of SPEC §12 restarts)."""
        self._last[self._mine_models + model_slot] = now

    def set_cursor(self, model_slot: int, value: int) -> None:
        self._cursor[model_slot] = value

    # ---- readers ----------------------------------------------------------------------------------------
    def inflight(self, slot: int) -> int:
        """Requests in flight to the replica in `slot`, over every worker (read on every routing decision)."""
        cells = self._inflight
        if self.workers == 1:
            return cells[slot]
        if self.workers == 2:
            return int(cells[slot] + cells[slot + self.replica_slots])
        step = self.replica_slots
        return sum(cells[slot + w * step] for w in range(self.workers))

    def last_request(self, model_slot: int) -> float:
        """When a request to the model last began or ended (epoch seconds; 0 when never)."""
        cells, step = self._last, self.model_slots
        return float(max(cells[model_slot + w * step] for w in range(self.workers)))

    def cursor(self, model_slot: int) -> int:
        return self._cursor[model_slot]

    def forget_row(self, row: int) -> None:
        """A worker died with requests in flight: its connections are gone, so are its counts."""
        start = row * self.replica_slots
        self._inflight[start : start + self.replica_slots] = memoryview(bytes(self.replica_slots * _CELL)).cast("q")

    def reset_model(self, model_slot: int) -> None:
        """Before a model slot is handed to another model."""
        for w in range(self.workers):
            self._last[model_slot + w * self.model_slots] = 0.0
        self._cursor[model_slot] = 0

    def close(self) -> None:
        for view in (self._inflight, self._last, self._cursor):
            view.release()
        if isinstance(self._buffer, mmap.mmap):
            self._buffer.close()
