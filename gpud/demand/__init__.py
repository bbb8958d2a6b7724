"""Models that follow demand (SPEC §12): durations, idle timers, the eviction planner, load-based scaling.

The pure parts (duration, idle, evict, scale) do no I/O and read no registry; `gpud.demand.loop` is the thin
asyncio shell that samples the registry and asks the model service to act. Importing this package imports
nothing heavy: the CLI validates durations with `gpud.demand.duration`.
"""
