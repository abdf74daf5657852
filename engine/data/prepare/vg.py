"""Visual Genome: ``region_descriptions.json`` and ``VG_100K/``, ``VG_100K_2/`` -> ``vg.arrow``, one row per image
with its region captions and boxes. See docs/tasks-and-data.md."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from engine.data.prepare import read, writer

VG_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("caption", writer.LIST_STRING),
        *((c, writer.LIST_INT) for c in ("width", "height", "x", "y")),
        ("image_id", writer.STRING),
    ]
)

_VG_FROM = ("Visual Genome's region_descriptions.json (visualgenome.org, in the source folder or annotations/) and "
            "its images VG_100K/ and VG_100K_2/ (in the source folder or images/)")
_VG_FOLDERS = (("VG_100K", "images/VG_100K"), ("VG_100K_2", "images/VG_100K_2"))


def _vg_output(job: writer.Job, name: str) -> writer.Output:
    """``vg.arrow``: the regions of ``region_descriptions.json`` grouped per image."""
    task, source = job.task, job.source
    path = read.find(source, task, ("region_descriptions.json", "annotations/region_descriptions.json"), _VG_FROM)
    folders = [read.find(source, task, _VG_FOLDERS[0], _VG_FROM, folder=True)]
    folders += [source / candidate for candidate in _VG_FOLDERS[1] if (source / candidate).is_dir()][:1]
    output = writer.Output(name, VG_SCHEMA)
    images: dict[int, tuple[list[str], list[int], list[int], list[int], list[int]]] = {}
    for index, record in enumerate(read.json_list(path, task, "images' regions ({'regions': [...], 'id': ...})")):
        where = f"[{index}]"
        regions = read.field(record, "regions", list, path, where, task)
        if not regions:
            image = f"image {record['id']}" if isinstance(record.get("id"), int) else where
            output.skipped.append(
                writer.SkippedRecord(name, image, writer.MISSING_ANNOTATION, f"{where} has no regions")
            )
        for k, region in enumerate(regions):
            at = f"{where}.regions[{k}]"
            cells = images.setdefault(read.field(region, "image_id", int, path, at, task), ([], [], [], [], []))
            for values, key in zip(cells, ("phrase", "width", "height", "x", "y")):
                values.append(read.field(region, key, str if key == "phrase" else int, path, at, task))
    for image_id, cells in images.items():
        candidates = [folder / f"{image_id}.jpg" for folder in folders]
        image = next((candidate for candidate in candidates if candidate.is_file()), candidates[0])
        output.rows.append(writer.Row(f"{image_id}.jpg", (image,), (*cells, str(image_id)), len(cells[0])))
    return output


def prepare_vg(
    source: Path, out: Path, *, progress: writer.Progress | None = None, force: bool = False
) -> writer.PrepareReport:
    """Visual Genome region captions in ViLT's layout (see docs/tasks-and-data.md)."""
    return writer.prepare_splits("vg", source, out, progress, force, {"train": "vg.arrow"},
                                 lambda job, pending: [_vg_output(job, "vg.arrow")])
