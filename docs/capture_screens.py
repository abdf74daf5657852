"""Text captures of every ren-tui screen, for docs/tui.md.

    .venv/bin/python docs/capture_screens.py [--size 100x24]

Renders each screen headless over a throw-away store of canned runs (the test
suite's fake engine) and prints what the terminal would show. Compose and
Freeze ask the real model inspector (it starts in a few seconds). The Queue
capture uses a simulated inventory of 4 GPUs, since the capture machine has none.
The Examples capture shows canned predictions around real easy-VQA pictures, drawn
in half-block characters (their colours are lost in text).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from textual.worker import WorkerCancelled  # noqa: E402

from engine.config import config_from_dict  # noqa: E402
from engine.jobs.gpus import GPU  # noqa: E402
from engine.runs import create_run  # noqa: E402
from engine.store import Store, process_start_time  # noqa: E402
from ren_tui.app import RenApp  # noqa: E402
from ren_tui.backend import Backend  # noqa: E402
from ren_tui.widgets import picture  # noqa: E402
from tests.tui_fake import TEST_PICKS, canned_predictions, canned_run, preset_config  # noqa: E402

GPUS = [GPU(index=i, uuid=f"GPU-{i}", name="NVIDIA H100 80GB HBM3", pci_bus_id=f"0000:{0x18 + i:02x}:00.0",
            memory_total_mb=81559, memory_used_mb=used, utilization_pct=util)
        for i, (used, util) in enumerate([(61234, 97), (60987, 95), (0, 0), (23456, 40)])]


def fill(store: Store) -> list[str]:
    """Canned runs: a freezing study, a running run, a queued one."""
    ids = []
    for name, lr, seed in (("electra-deit-frozen-vision", "1e-4", 1), ("electra-deit-full", "1e-4", 2),
                           ("electra-deit-full-lr3e-4", "3e-4", 3)):
        config = preset_config(overrides=[f"optim.lr={lr}"] + (['freeze.groups=["vision"]'] if "frozen" in name
                                                               else []))
        ids.append(canned_run(store, name, tags=("study:freeze",), seed=seed, config=config, steps=1000,
                              keys=("loss",), eval_every=250).id)
    canned_predictions(store, ids[-1], "test", TEST_PICKS, samples=700)
    running = canned_run(store, "deit-one-tower-mlm-itm", status="running", steps=4000, written=1500, seed=4,
                         stage="pretrain", kind="one_tower", keys=("loss", "loss_mlm", "loss_itm"), eval_every=0)
    store.update_run(running.id, devices=(0, 1), gpus=2, device="2x NVIDIA H100 80GB HBM3",
                     loss_trace=(5.1, 4.0, 3.2, 2.9, 2.6, 2.5, 2.4, 2.3), started_at=time.time() - 7_380,
                     runner_pid=os.getpid(), runner_started=process_start_time(os.getpid()),
                     host=socket.gethostname())
    queued = create_run(store, config_from_dict(preset_config("electra_deit_two_tower_pretrain.toml")), None)
    store.enqueue(queued.id, gpus=4)
    return ids + [running.id]


def text(app: RenApp) -> str:
    return "\n".join(strip.text.rstrip() for strip in app.screen._compositor.render_strips())


async def capture(size: tuple[int, int]) -> dict[str, str]:
    root = Path(tempfile.mkdtemp(prefix="ren-capture-"))
    store = Store(root)
    ids = fill(store)
    app = RenApp(Backend(store, start_worker=False, inventory=lambda: GPUS))
    shots: dict[str, str] = {}
    async with app.run_test(size=size) as pilot:
        app.sub_title = "~/.local/share/ren"

        async def settle(seconds: float = 0.3) -> None:
            with contextlib.suppress(WorkerCancelled):  # an exclusive worker replaced by a newer one
                await app.workers.wait_for_complete()
            await pilot.pause(seconds)

        await settle()
        shots["Runs"] = text(app)
        app.open_monitor(ids[3])
        await settle(1.0)
        shots["Monitor"] = text(app)
        app.pop_screen()
        app.open_examples(ids[2])
        await settle(1.0)
        await pilot.press("down", "down")
        await settle()
        shots["Examples"] = text(app)
        app.pop_screen()
        app.open_compare(ids[:3])
        await settle(1.0)
        shots["Compare"] = text(app)
        app.pop_screen()
        await app.switch_mode("queue")
        await settle(1.5)
        shots["Queue"] = text(app)
        app.clone_to_compose(store.get_run(ids[1]).config)
        for _ in range(300):  # the inspector starts (torch import), then answers
            await settle(0.2)
            if "starting" not in text(app) and "checking" not in text(app):
                break
        shots["Compose"] = text(app)
        await pilot.press("f")
        await settle(1.0)
        await pilot.press("v")
        await settle(0.5)
        shots["Freeze"] = text(app)
    app.backend.close_inspector()
    return shots


def main() -> None:
    os.environ[picture.ENV] = "halfblock"  # whatever terminal runs this, as over plain SSH,
    picture.cell_size = lambda: picture.DEFAULT_CELL  # with textual-image's default cell
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="100x28")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    shots = asyncio.run(capture((width, height)))
    print("# ren-tui screens\n\nGenerated by `docs/capture_screens.py` from canned runs "
          f"({width}x{height} terminal; the Queue screen with a simulated 4-GPU inventory).\n")
    for name, shot in shots.items():
        print(f"## {name}\n\n```text\n{shot}\n```\n")


if __name__ == "__main__":
    main()
