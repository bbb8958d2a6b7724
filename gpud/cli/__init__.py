"""The `gpud` command line: stdlib only (no aiohttp, no psutil), so that commands start fast."""
