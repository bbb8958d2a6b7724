"""Least-connections choice among a model's ready replicas (pure: no I/O, called once per proxied request).

SPEC §9: the replica with the fewest in-flight requests wins; ties are broken by rotating through the tied
replicas in index order, so 9 sequential requests to 3 idle replicas go 3/3/3. In-flight counts are read
through `inflight(slot)`, which sums every proxy worker's count (gpud.proxy.counters), so the choice is the
same whichever worker makes it. The rotation cursor holds the index *after* the last tie-break winner: the
next tie goes to the first tied replica at or above it, wrapping around. A cursor by index (rather than a
counter modulo the number of tied replicas) keeps the rotation fair when the set of tied replicas changes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from gpud.proxy.table import ReplicaRoute


def choose(
    ready: Sequence[ReplicaRoute],
    inflight: Callable[[int], int],
    cursor: int,
    exclude: Collection[int] = (),
) -> tuple[ReplicaRoute | None, int]:
    """The ready replica (not in `exclude`, by index) with the fewest in-flight requests, and the new cursor.

    `ready` is in index order. Linear in the number of replicas; the cursor only matters on a tie.
    """
    best: ReplicaRoute | None = None
    best_load = 0
    tied: list[ReplicaRoute] = []
    for replica in ready:
        if exclude and replica.index in exclude:
            continue
        load = inflight(replica.slot)
        if best is None or load < best_load:
            best, best_load, tied = replica, load, [replica]
        elif load == best_load:
            tied.append(replica)
    if best is None:
        return None, cursor
    if len(tied) > 1:
        # The first tied replica at or above the cursor, else wrap to the lowest index (`ready` is sorted).
        best = next((r for r in tied if r.index >= cursor), tied[0])
    return best, best.index + 1
