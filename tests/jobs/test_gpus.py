"""The GPU inventory: CUDA_VISIBLE_DEVICES parsing, run environments, and NVML reads through a fake pynvml."""

from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import dataclass, field

import pytest

from engine.jobs.gpus import GPU, devices_env, parse_visible_devices, visible_gpus
from tests.helpers.paths import REPO

UUIDS = (
    "GPU-1a2b3c4d-0000-0000-0000-000000000000",
    "GPU-1a2b9999-0000-0000-0000-000000000001",
    "GPU-77aa0000-0000-0000-0000-000000000002",
    "GPU-c0ffee00-0000-0000-0000-000000000003",
)
GPUS = [
    GPU(index=i, uuid=uuid, name="NVIDIA H100 80GB HBM3", pci_bus_id=f"00000000:{0x18 + i:02X}:00.0",
        memory_total_mb=81559, memory_used_mb=0)
    for i, uuid in enumerate(UUIDS)
]


def indices(gpus: list[GPU]) -> list[int]:
    return [gpu.index for gpu in gpus]


# --- parse_visible_devices ------------------------------------------------------------------------------------------


def test_unset_leaves_all_in_index_order() -> None:
    assert indices(parse_visible_devices(None, list(reversed(GPUS)))) == [0, 1, 2, 3]


@pytest.mark.parametrize("value", ["", "-1", "none", "NoDevFiles", " ", ","])
def test_hiding_values_leave_none(value: str) -> None:
    assert parse_visible_devices(value, GPUS) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", [0]),
        ("3", [3]),
        ("1,3", [1, 3]),
        ("2,0", [2, 0]),
        ("3,2,1,0", [3, 2, 1, 0]),
        ("0,1,", [0, 1]),
        (" 2 , 0 ", [2, 0]),
        ("\t1,\n3", [1, 3]),
    ],
)
def test_indices_keep_the_listed_order(value: str, expected: list[int]) -> None:
    assert indices(parse_visible_devices(value, GPUS)) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0,2,-1,1", [0, 2]),  # the example in CUDA's documentation
        ("1,7,0", [1]),  # no GPU 7
        ("2,abc,0", [2]),
        ("1,,2", [1]),
        ("3,1x,0", [3]),
        ("0,+1", [0]),
        ("1,GPU-77aa", [1]),  # a list of indices cannot switch to UUIDs
    ],
)
def test_an_invalid_index_stops_parsing(value: str, expected: list[int]) -> None:
    assert indices(parse_visible_devices(value, GPUS)) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (UUIDS[2], [2]),
        (f"{UUIDS[3]},{UUIDS[0]}", [3, 0]),
        ("GPU-77aa,GPU-c0ffee", [2, 3]),
        ("GPU-1a2b3,GPU-1a2b9", [0, 1]),
        (f"  {UUIDS[1]} ,  GPU-c0 ", [1, 3]),
    ],
)
def test_uuids_and_unique_prefixes(value: str, expected: list[int]) -> None:
    assert indices(parse_visible_devices(value, GPUS)) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("GPU-c0,GPU-1a2b,GPU-77aa", [3]),  # GPU-1a2b is a prefix of two UUIDs
        ("GPU-1a2b", []),
        ("GPU-", []),
        ("GPU-77aa,GPU-ffff,GPU-c0", [2]),  # no such UUID
        ("GPU-77aa,3", [2]),  # a list of UUIDs cannot switch to indices
        ("GPU-77AA", []),  # UUIDs are case-sensitive
        ("MIG-c0ffee00", []),
    ],
)
def test_an_ambiguous_or_unknown_uuid_stops_parsing(value: str, expected: list[int]) -> None:
    assert indices(parse_visible_devices(value, GPUS)) == expected


@pytest.mark.parametrize("value", ["0,1,0", "2,2", "GPU-77aa,GPU-c0,GPU-77aa0000"])
def test_a_gpu_listed_twice_leaves_none(value: str) -> None:
    assert parse_visible_devices(value, GPUS) == []


def test_parsing_only_sees_the_given_gpus() -> None:
    assert parse_visible_devices("0,1", []) == []
    assert indices(parse_visible_devices("2,0,1", GPUS[:2])) == []
    assert indices(parse_visible_devices("1,0,2", GPUS[:2])) == [1, 0]


# --- devices_env ----------------------------------------------------------------------------------------------------


def test_devices_env_lists_physical_indices_in_order() -> None:
    assert devices_env([GPUS[2], GPUS[3]]) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert devices_env([GPUS[3], GPUS[0]])["CUDA_VISIBLE_DEVICES"] == "3,0"
    assert devices_env([GPUS[1]])["CUDA_VISIBLE_DEVICES"] == "1"


def test_devices_env_for_no_gpus_hides_them_all() -> None:
    assert devices_env([]) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ""}


def test_devices_env_round_trips_through_parsing() -> None:
    chosen = [GPUS[3], GPUS[1]]
    assert parse_visible_devices(devices_env(chosen)["CUDA_VISIBLE_DEVICES"], GPUS) == chosen


def test_memory_free() -> None:
    gpu = GPU(index=0, uuid=UUIDS[0], name="x", pci_bus_id="0", memory_total_mb=1000, memory_used_mb=300)
    assert gpu.memory_free_mb == 700


# --- visible_gpus through a fake pynvml -----------------------------------------------------------------------------


@dataclass
class FakeDevice:
    uuid: str
    name: str
    bus_id: str
    total: int  # bytes
    used: int  # bytes
    pids: list[int]
    process_error: str = ""  # the fake's exception class the process query raises, if any
    as_bytes: bool = False  # answer strings as bytes, like older nvidia-ml-py
    lost: bool = False  # NVML cannot get a handle (e.g. the GPU fell off the bus)
    utilization: int = 0  # percent
    utilization_error: str = ""  # the fake's exception class the utilisation query raises, if any


@dataclass
class FakeNVML:
    """The calls ``engine.jobs.gpus`` makes, answered from ``devices``, with a record of init/shutdown."""

    devices: list[FakeDevice]
    init_error: bool = False
    count_error: bool = False
    calls: list[str] = field(default_factory=list)

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")

        class NVMLError(Exception):
            pass

        class NVMLLibraryMismatchError(Exception):  # nvidia-ml-py 13: not an NVMLError
            pass

        def text(device: FakeDevice, value: str) -> str | bytes:
            return value.encode() if device.as_bytes else value

        def init() -> None:
            self.calls.append("init")
            if self.init_error:
                raise NVMLError("Driver Not Loaded")

        def count() -> int:
            if self.count_error:
                raise NVMLError("Unknown Error")
            return len(self.devices)

        def handle(index: int) -> FakeDevice:
            if self.devices[index].lost:
                raise NVMLError("GPU is lost")
            return self.devices[index]

        def processes(device: FakeDevice) -> list[types.SimpleNamespace]:
            if device.process_error:
                raise getattr(mod, device.process_error)("Not Supported")
            return [types.SimpleNamespace(pid=pid, usedGpuMemory=1 << 30) for pid in device.pids]

        def utilization(device: FakeDevice) -> types.SimpleNamespace:
            if device.utilization_error:
                raise getattr(mod, device.utilization_error)("Not Supported")
            return types.SimpleNamespace(gpu=device.utilization, memory=device.utilization // 2)

        mod.NVMLError = NVMLError
        mod.NVMLLibraryMismatchError = NVMLLibraryMismatchError
        mod.nvmlInit = init
        mod.nvmlShutdown = lambda: self.calls.append("shutdown")
        mod.nvmlDeviceGetCount = count
        mod.nvmlDeviceGetHandleByIndex = handle
        mod.nvmlDeviceGetUUID = lambda d: text(d, d.uuid)
        mod.nvmlDeviceGetName = lambda d: text(d, d.name)
        mod.nvmlDeviceGetPciInfo = lambda d: types.SimpleNamespace(busId=text(d, d.bus_id))
        mod.nvmlDeviceGetMemoryInfo = lambda d: types.SimpleNamespace(total=d.total, used=d.used, free=d.total - d.used)
        mod.nvmlDeviceGetComputeRunningProcesses = processes
        mod.nvmlDeviceGetUtilizationRates = utilization
        return mod


GIB = 1 << 30


def four_gpus() -> FakeNVML:
    return FakeNVML([
        FakeDevice(UUIDS[0], "NVIDIA A100-SXM4-80GB", "00000000:07:00.0", 80 * GIB, 512 << 20, [], utilization=87),
        FakeDevice(UUIDS[1], "NVIDIA A100-SXM4-80GB", "00000000:0B:00.0", 80 * GIB, 40 * GIB, [4242, 4243, 4242],
                   as_bytes=True),
        FakeDevice(UUIDS[2], "NVIDIA A100-SXM4-40GB", "00000000:48:00.0", 40 * GIB, 39 * GIB + 1, [9],
                   process_error="NVMLError", utilization_error="NVMLError"),
        FakeDevice(UUIDS[3], "NVIDIA A100-SXM4-40GB", "00000000:4C:00.0", 40 * GIB, 0, [77], as_bytes=True),
    ])


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNVML:
    fake = four_gpus()
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake


def test_reads_every_gpu(nvml: FakeNVML) -> None:
    assert visible_gpus({}) == [
        GPU(0, UUIDS[0], "NVIDIA A100-SXM4-80GB", "00000000:07:00.0", 81920, 512, (), 87),
        GPU(1, UUIDS[1], "NVIDIA A100-SXM4-80GB", "00000000:0B:00.0", 81920, 40960, (4242, 4243), 0),
        GPU(2, UUIDS[2], "NVIDIA A100-SXM4-40GB", "00000000:48:00.0", 40960, 39936, (), None),
        GPU(3, UUIDS[3], "NVIDIA A100-SXM4-40GB", "00000000:4C:00.0", 40960, 0, (77,), 0),
    ]
    assert nvml.calls == ["init", "shutdown"]


def test_bytes_from_older_nvidia_ml_py_become_str(nvml: FakeNVML) -> None:
    gpu = visible_gpus({})[1]
    assert (gpu.uuid, gpu.name, gpu.pci_bus_id) == (UUIDS[1], "NVIDIA A100-SXM4-80GB", "00000000:0B:00.0")
    assert all(isinstance(v, str) for g in visible_gpus({}) for v in (g.uuid, g.name, g.pci_bus_id))


def test_a_failing_process_query_gives_no_pids(nvml: FakeNVML) -> None:
    gpu = visible_gpus({})[2]
    assert gpu.pids == ()
    assert gpu.memory_used_mb == 39936


def test_a_driver_too_old_for_the_process_query_gives_no_pids(nvml: FakeNVML) -> None:
    nvml.devices[3].process_error = "NVMLLibraryMismatchError"
    assert [gpu.pids for gpu in visible_gpus({})] == [(), (4242, 4243), (), ()]


def test_utilization_nvml_will_not_give_is_none(nvml: FakeNVML) -> None:
    nvml.devices[0].utilization_error = "NVMLLibraryMismatchError"
    assert [gpu.utilization_pct for gpu in visible_gpus({})] == [None, 0, None, 0]
    assert [gpu.memory_used_mb for gpu in visible_gpus({})] == [512, 40960, 39936, 0]


@pytest.mark.parametrize(
    ("cvd", "expected"),
    [("2,0", [2, 0]), ("3", [3]), ("", []), ("-1", []), ("1,9,2", [1]), (f"{UUIDS[3]},GPU-77aa", [3, 2])],
)
def test_filters_by_cuda_visible_devices_from_env(nvml: FakeNVML, cvd: str, expected: list[int]) -> None:
    assert indices(visible_gpus({"CUDA_VISIBLE_DEVICES": cvd})) == expected
    assert nvml.calls == ["init", "shutdown"]


def test_reads_cuda_visible_devices_from_os_environ_by_default(nvml: FakeNVML, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert indices(visible_gpus()) == [3, 1]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert indices(visible_gpus()) == [0, 1, 2, 3]


def test_a_device_nvml_cannot_read_is_left_out(nvml: FakeNVML) -> None:
    nvml.devices[1].lost = True
    assert indices(visible_gpus({})) == [0, 2, 3]
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_error_on_init_gives_no_gpus_and_no_shutdown(nvml: FakeNVML) -> None:
    nvml.init_error = True
    assert visible_gpus({}) == []
    assert nvml.calls == ["init"]


def test_nvml_error_after_init_gives_no_gpus_and_shuts_down(nvml: FakeNVML) -> None:
    nvml.count_error = True
    assert visible_gpus({}) == []
    assert nvml.calls == ["init", "shutdown"]


def test_missing_pynvml_gives_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert visible_gpus({}) == []


def test_real_nvml_never_raises() -> None:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver (this CI machine)
        assert visible_gpus() == []
        return
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    gpus = visible_gpus({})
    assert [gpu.index for gpu in gpus] == list(range(count))
    assert all(gpu.uuid.startswith(("GPU-", "MIG-")) and gpu.memory_total_mb > 0 for gpu in gpus)


def test_import_is_cheap() -> None:
    code = "import engine.jobs.gpus, sys; assert 'pynvml' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
