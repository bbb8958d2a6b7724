"""A tiny GPU replica for bench/gpu-check: it holds GPU memory and says which GPU CUDA shows it.

    python bench/torch_replica.py --host 127.0.0.1 --port PORT [--alloc-gib 1] [--child-gib 0.5]
                                  [--backend auto|torch|driver]

It is started by gpud's `command` engine, so it sees what a vLLM replica would see:

* it allocates `--alloc-gib` GiB on device 0 (with gpud, the only device CUDA_VISIBLE_DEVICES leaves it),
  with PyTorch (`torch.empty(…, device="cuda:0")`) or, when PyTorch is not installed, through the CUDA
  driver API (libcuda.so.1, which every NVIDIA driver installs) with ctypes;
* with `--child-gib` > 0 it starts a child process that allocates that much on device 0 too, as vLLM's
  EngineCore does: gpud must find and stop it, and only then release the reservation;
* once both hold their memory it serves `GET /health` (200) and `GET /info`, a JSON object with its pid,
  the child's pid, CUDA_VISIBLE_DEVICES, the number of devices CUDA shows, and the visible device's name,
  UUID and PCI bus id, until SIGTERM.

It also prints that object to stdout, which gpud keeps in the replica's log.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

GiB = 2**30


class Gpu(Protocol):
    def allocate(self, nbytes: int) -> None: ...
    def info(self) -> dict[str, Any]: ...


class TorchGpu:
    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("PyTorch is installed but CUDA is not available to it")
        self.torch = torch
        self.blocks: list[Any] = []

    def allocate(self, nbytes: int) -> None:
        block = self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda:0")
        block.fill_(1)  # touch it: the memory is really there, not only promised
        self.torch.cuda.synchronize()
        self.blocks.append(block)

    def info(self) -> dict[str, Any]:
        props = self.torch.cuda.get_device_properties(0)
        uuid = getattr(props, "uuid", None)  # PyTorch 2.1+
        bus = getattr(props, "pci_bus_id", None)
        pci = f"{getattr(props, 'pci_domain_id', 0) or 0:X}:{bus:02X}:{getattr(props, 'pci_device_id', 0) or 0:02X}.0" \
            if isinstance(bus, int) else None
        return {"backend": "torch", "device_count": self.torch.cuda.device_count(), "name": props.name,
                "uuid": f"GPU-{uuid}" if uuid is not None else None, "pci_bus_id": pci,
                "total_bytes": props.total_memory}


class DriverGpu:
    """The CUDA driver API through ctypes: a context on device 0 and cuMemAlloc'ed blocks."""

    def __init__(self) -> None:
        self.cuda = ctypes.CDLL("libcuda.so.1")
        self._call("cuInit", 0)
        self.device = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(self.device), 0)
        self.context = ctypes.c_void_p()
        self._call("cuCtxCreate_v2", ctypes.byref(self.context), 0, self.device)
        self.blocks: list[ctypes.c_uint64] = []

    def _call(self, name: str, *args: Any) -> None:
        code = getattr(self.cuda, name)(*args)
        if code != 0:
            text = ctypes.c_char_p()
            self.cuda.cuGetErrorString(code, ctypes.byref(text))
            raise RuntimeError(f"{name} failed: {(text.value or b'?').decode()} ({code})")

    def allocate(self, nbytes: int) -> None:
        ptr = ctypes.c_uint64()
        self._call("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(nbytes))
        self._call("cuMemsetD8_v2", ptr, ctypes.c_ubyte(1), ctypes.c_size_t(nbytes))
        self._call("cuCtxSynchronize")
        self.blocks.append(ptr)

    def info(self) -> dict[str, Any]:
        count = ctypes.c_int()
        self._call("cuDeviceGetCount", ctypes.byref(count))
        name = ctypes.create_string_buffer(256)
        self._call("cuDeviceGetName", name, 256, self.device)
        raw = ctypes.create_string_buffer(16)
        self._call("cuDeviceGetUuid", raw, self.device)
        h = raw.raw.hex()
        pci = ctypes.create_string_buffer(64)
        self._call("cuDeviceGetPCIBusId", pci, 64, self.device)
        total = ctypes.c_size_t()
        self._call("cuDeviceTotalMem_v2", ctypes.byref(total), self.device)
        return {"backend": "driver", "device_count": count.value, "name": name.value.decode(),
                "uuid": f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
                "pci_bus_id": pci.value.decode(), "total_bytes": total.value}


def open_gpu(backend: str) -> Gpu:
    if backend in ("auto", "torch"):
        try:
            return TorchGpu()
        except ImportError:
            if backend == "torch":
                raise
    return DriverGpu()


def hold_memory(backend: str, gib: float, ready: Any) -> None:
    """The child: allocate, report, then wait until killed (its default SIGTERM action ends it)."""
    gpu = open_gpu(backend)
    gpu.allocate(int(gib * GiB))
    ready.put(os.getpid())
    threading.Event().wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--alloc-gib", type=float, default=1.0, help="GiB this process allocates on device 0")
    parser.add_argument("--child-gib", type=float, default=0.5, help="GiB a child process allocates (0: no child)")
    parser.add_argument("--backend", choices=["auto", "torch", "driver"], default="auto",
                        help="torch, the CUDA driver API, or auto: torch when it is installed")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        gpu = open_gpu(args.backend)
        gpu.allocate(int(args.alloc_gib * GiB))
    except (ImportError, OSError, RuntimeError) as exc:
        print(f"torch_replica: cannot use the GPU: {exc}", file=sys.stderr, flush=True)
        return 1

    child_pid = None
    if args.child_gib > 0:
        # spawn, not fork: a forked child cannot use the parent's CUDA context.
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Queue()
        child = ctx.Process(target=hold_memory, args=(args.backend, args.child_gib, ready), daemon=True)
        child.start()
        child_pid = ready.get(timeout=120)

    info = {"pid": os.getpid(), "child_pid": child_pid,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), **gpu.info()}
    print(f"torch_replica: {json.dumps(info)}", flush=True)
    body = json.dumps(info).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            status, payload = {"/health": (200, b""), "/info": (200, body)}.get(self.path, (404, b"{}"))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *log_args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
