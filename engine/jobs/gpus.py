"""The GPUs on this machine, read through NVML, and the environment that places a run on some of them.

Importing this module is cheap: ``pynvml`` is imported only when :func:`visible_gpus` runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_MIB = 1 << 20
_UUID_PREFIXES = ("GPU-", "MIG-")


@dataclass(frozen=True)
class GPU:
    """One physical GPU as NVML reports it; memory in MiB (what nvidia-smi shows as "MiB")."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str
    memory_total_mb: int
    memory_used_mb: int
    pids: tuple[int, ...] = ()
    utilization_pct: int | None = None
    """Percent of the last sample period in which a kernel ran; None when NVML will not say."""

    @property
    def memory_free_mb(self) -> int:
        return self.memory_total_mb - self.memory_used_mb


def parse_visible_devices(value: str | None, gpus: Sequence[GPU]) -> list[GPU]:
    """The GPUs that ``CUDA_VISIBLE_DEVICES=value`` leaves visible, in the order it lists them.

    ``None`` leaves all ``gpus`` visible, in index order. Entries are indices (``GPU.index``, i.e. PCI bus
    order, as runs get ``CUDA_DEVICE_ORDER=PCI_BUS_ID``), or UUIDs or unique UUID prefixes starting with
    "GPU-"/"MIG-"; whitespace around an entry is ignored. As in CUDA, the first entry decides whether the
    list holds indices or UUIDs, parsing stops at the first entry that names no GPU (so "", "-1" and "none"
    leave none), and a GPU named twice leaves none.
    """
    if value is None:
        return sorted(gpus, key=lambda gpu: gpu.index)
    entries = [entry.strip() for entry in value.split(",")]
    by_uuid = entries[0].startswith(_UUID_PREFIXES)
    visible: list[GPU] = []
    for entry in entries:
        gpu = _by_uuid_prefix(entry, gpus) if by_uuid else _by_index(entry, gpus)
        if gpu is None:
            break
        if gpu in visible:
            return []
        visible.append(gpu)
    return visible


def _by_index(entry: str, gpus: Sequence[GPU]) -> GPU | None:
    if not (entry.isascii() and entry.isdigit()):
        return None
    return next((gpu for gpu in gpus if gpu.index == int(entry)), None)


def _by_uuid_prefix(entry: str, gpus: Sequence[GPU]) -> GPU | None:
    if not entry.startswith(_UUID_PREFIXES):
        return None
    matches = [gpu for gpu in gpus if gpu.uuid.startswith(entry)]
    return matches[0] if len(matches) == 1 else None


def visible_gpus(env: Mapping[str, str] | None = None) -> list[GPU]:
    """The GPUs this process may use: NVML's, filtered and ordered by ``CUDA_VISIBLE_DEVICES`` from ``env``
    (default ``os.environ``) as :func:`parse_visible_devices` does, so ``result[i]`` is ``cuda:i``.

    ``[]`` when NVML is unavailable (no ``pynvml``, no driver or library, an NVML error on init or count);
    a device NVML fails to read is left out. Never raises for either.
    """
    env = os.environ if env is None else env
    return parse_visible_devices(env.get("CUDA_VISIBLE_DEVICES"), _nvml_gpus())


def _nvml_gpus() -> list[GPU]:
    """Every GPU NVML can read, in NVML index order; shuts NVML down again after a successful init."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            with contextlib.suppress(pynvml.NVMLError):
                gpus.append(_read_gpu(pynvml, index))
        return gpus
    except pynvml.NVMLError:
        return []
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _read_gpu(nvml: Any, index: int) -> GPU:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return GPU(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
        memory_total_mb=memory.total // _MIB,
        memory_used_mb=memory.used // _MIB,
        pids=_compute_pids(nvml, handle),
        utilization_pct=_utilization(nvml, handle),
    )


def _query_errors(nvml: Any) -> tuple[type[Exception], ...]:
    """What an optional NVML query raises when the device or driver cannot answer it."""
    # When the driver lacks a call, nvidia-ml-py 13 raises NVMLLibraryMismatchError, which is no NVMLError;
    # 12 raises an NVMLError and has no such class.
    return (nvml.NVMLError, getattr(nvml, "NVMLLibraryMismatchError", nvml.NVMLError))


def _compute_pids(nvml: Any, handle: Any) -> tuple[int, ...]:
    """The distinct pids of the compute processes on ``handle``; ``()`` if NVML will not say."""
    try:
        processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except _query_errors(nvml):
        return ()
    return tuple(dict.fromkeys(process.pid for process in processes))


def _utilization(nvml: Any, handle: Any) -> int | None:
    """The GPU's utilisation in percent (NVML's ``gpu`` rate); None if NVML will not say."""
    try:
        return int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except _query_errors(nvml):
        return None


def _text(value: str | bytes) -> str:
    """NVML strings: ``str`` from recent nvidia-ml-py, ``bytes`` from older ones."""
    return value.decode() if isinstance(value, bytes) else value


def devices_env(gpus: Sequence[GPU]) -> dict[str, str]:
    """The environment that places a run on ``gpus`` (physical indices, in order); no GPUs gives
    ``CUDA_VISIBLE_DEVICES=""`` so a CPU run cannot grab one."""
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(gpu.index) for gpu in gpus),
    }
