"""CustomAllReduce: the one-shot Triton all-reduce's shared buffers, set up once per tensor-parallel group.

Each rank allocates one device buffer with the CUDA driver (two data halves + a flag array), publishes its IPC
handle in the group's rendezvous store and maps every peer's buffer into its own context (peer access over
NVLink; the same device also works, which is how it is tested on one GPU). Tensors above ``max_bytes`` or of
other dtypes go to NCCL. The driver calls go through ctypes on libcuda (no extra dependency).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch
import torch.distributed as dist

from tokenmill.kernels.one_shot_all_reduce import MAX_PROGRAMS, MAX_WORLD, one_shot_all_reduce

logger = logging.getLogger(__name__)

_LAZY_ENABLE_PEER_ACCESS = 1


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # c_char would read back only up to the first zero byte


class _Driver:
    """The few CUDA driver calls needed, each checked."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.lib.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), _IpcHandle, ctypes.c_uint]
        self.lib.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_uint64]

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError(f"{what} failed: CUDA driver error {result} ({(name.value or b'?').decode()})")

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cuMemAlloc")
        return ptr.value

    def zero(self, ptr: int, nbytes: int) -> None:
        self._check(self.lib.cuMemsetD8_v2(ctypes.c_uint64(ptr), ctypes.c_ubyte(0), ctypes.c_size_t(nbytes)),
                    "cuMemsetD8")

    def free(self, ptr: int) -> None:
        self._check(self.lib.cuMemFree_v2(ctypes.c_uint64(ptr)), "cuMemFree")

    def export(self, ptr: int) -> bytes:
        handle = _IpcHandle()
        self._check(self.lib.cuIpcGetMemHandle(ctypes.byref(handle), ctypes.c_uint64(ptr)), "cuIpcGetMemHandle")
        return bytes(handle.reserved)  # all 64 bytes

    def open(self, handle: bytes) -> int:
        ptr = ctypes.c_uint64()
        if len(handle) != 64:
            raise RuntimeError(f"a CUDA IPC handle has 64 bytes; got {len(handle)}")
        raw = _IpcHandle.from_buffer_copy(handle)
        self._check(self.lib.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), raw, ctypes.c_uint(_LAZY_ENABLE_PEER_ACCESS)),
                    "cuIpcOpenMemHandle")
        return ptr.value

    def close(self, ptr: int) -> None:
        self._check(self.lib.cuIpcCloseMemHandle(ctypes.c_uint64(ptr)), "cuIpcCloseMemHandle")


class CustomAllReduce:
    def __init__(self, rank: int, world_size: int, store: dist.Store, device: torch.device,
                 max_bytes: int = 8 * 1024 * 1024, key: str = "tokenmill-all-reduce") -> None:
        if not 2 <= world_size <= MAX_WORLD:
            raise ValueError(f"the custom all-reduce takes 2..{MAX_WORLD} ranks; got {world_size}")
        self.rank, self.world_size, self.device, self.max_bytes = rank, world_size, device, max_bytes
        torch.cuda.set_device(device)
        torch.empty(1, device=device)  # makes this device's primary context current for the driver calls
        self._driver = _Driver()
        self._flag_bytes = MAX_PROGRAMS * MAX_WORLD * 4
        nbytes = 2 * max_bytes + self._flag_bytes
        self._own = self._driver.alloc(nbytes)
        self._opened: list[int] = []
        try:
            self._driver.zero(self._own, nbytes)
            store.set(f"{key}/{rank}", self._driver.export(self._own))
            bases = []
            for peer in range(world_size):
                if peer == rank:
                    bases.append(self._own)
                else:
                    base = self._driver.open(store.get(f"{key}/{peer}"))
                    self._opened.append(base)
                    bases.append(base)
        except BaseException:
            self.close()
            raise
        self.data_table = torch.tensor(bases, dtype=torch.int64, device=device)
        self.flag_table = torch.tensor([b + 2 * max_bytes for b in bases], dtype=torch.int64, device=device)
        self.counters = torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=device)
        logger.info("custom all-reduce: rank %d of %d, %d MiB per call", rank, world_size, max_bytes >> 20)

    def takes(self, tensor: torch.Tensor) -> bool:
        return (tensor.device == self.device and tensor.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and tensor.is_contiguous() and tensor.numel() * tensor.element_size() <= self.max_bytes)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group in place (every rank must call with the same shapes in the same order)."""
        return one_shot_all_reduce(tensor, self.data_table, self.flag_table, self.counters,
                                   self.max_bytes // tensor.element_size(), self.rank, self.world_size)

    def close(self) -> None:
        """Unmap the peers' buffers and free this rank's (after the device has finished using them)."""
        driver: Any = getattr(self, "_driver", None)
        if driver is None:
            return
        torch.cuda.synchronize(self.device)
        for base in self._opened:
            driver.close(base)
        self._opened = []
        if self._own:
            driver.free(self._own)
            self._own = 0
