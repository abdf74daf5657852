"""Read back what experiment trackers wrote, with the trackers' own formats: a local MLflow server, and
the records of a W&B offline run."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

W_AND_B_BLOCK = 32768  # a .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) records
W_AND_B_HEADER = 7  # ":W&B", a 2-byte magic, a version byte
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(root: Path, timeout_s: float = 90.0) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend under ``root``; yields its URI."""
    port = free_port()
    log = (root / "mlflow-server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", str(root / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (root / "mlflow-server.log").read_text()
            assert time.monotonic() < deadline, f"mlflow server not up in {timeout_s} s"
            time.sleep(0.25)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a W&B run file (``run-ID.wandb``), parsed with W&B's own message type."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", W_AND_B_HEADER
    while pos + 7 <= len(data):
        room = W_AND_B_BLOCK - pos % W_AND_B_BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(path: Path) -> list[dict[str, Any]]:
    """Each history row of a W&B run file, as {key: value}."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]


def wandb_config(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "config":
            config.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.config.update})
    return config
