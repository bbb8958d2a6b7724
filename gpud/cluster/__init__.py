"""Beyond one machine (SPEC §16): this node's models registered with a Shepherd Model Gateway, kept true.

    settings.py   ClusterSettings (the defaults) and the `[cluster]` table validated into it
    workers.py    what this node wants registered, and the plan that makes the gateway's list match (pure)
    client.py     a small client of the gateway's control plane (aiohttp; no gateway code imported)
    registrar.py  the reconcile loop: on the registry's changes and every sync_sec, with backoff

gpud does not grow a cluster protocol of its own: the gateway balances, probes and retries; gpud tells it
which of this node's models exist, under per-model URLs (`{advertise}/m/{NAME}`, gpud.proxy.paths).
"""
