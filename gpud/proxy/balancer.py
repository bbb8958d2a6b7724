"""Least-connections choice among a model's ready replicas (pure: no I/O, called once per proxied request).

SPEC §9: the replica with the fewest in-flight requests wins; ties are broken by rotating through the tied
replicas in index order, so 9 sequential requests to 3 idle replicas go 3/3/3. The rotation cursor lives on
the model (`Model.rotation`) and holds the index *after* the last tie-break winner: the next tie goes to the
first tied replica at or above it, wrapping around. A cursor by index (rather than a counter modulo the
number of tied replicas) keeps the rotation fair when the set of tied replicas changes between requests.
"""

from __future__ import annotations

from collections.abc import Collection

from gpud.registry import Model, Replica, ReplicaState

_READY = ReplicaState.READY


def choose(model: Model, exclude: Collection[int] = ()) -> Replica | None:
    """The READY replica (not in `exclude`, by index) with the fewest in-flight requests, or None.

    Advances `model.rotation` when it breaks a tie. Linear in the number of replicas, no sorting unless
    several replicas tie (the common case for idle replicas is handled in the same single pass).
    """
    best: Replica | None = None
    tied: list[Replica] = []
    for replica in model.replicas.values():
        if replica.state is not _READY or (exclude and replica.index in exclude):
            continue
        if best is None or replica.inflight < best.inflight:
            best = replica
            tied = [replica]
        elif replica.inflight == best.inflight:
            tied.append(replica)
    if best is None:
        return None
    if len(tied) > 1:
        cursor = model.rotation
        # The first tied replica at or above the cursor, else wrap to the lowest index.
        above = [r for r in tied if r.index >= cursor]
        best = min(above or tied, key=_index)
    model.rotation = best.index + 1
    return best


def _index(replica: Replica) -> int:
    return replica.index
