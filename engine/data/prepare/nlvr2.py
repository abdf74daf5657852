"""NLVR2: the JSON-lines files and ``images/`` -> ``nlvr2_{train,dev,test1}.arrow`` (and the balanced and unbalanced
splits when their files exist), one row per image pair. See docs/tasks-and-data.md."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from engine.data.prepare import read, writer
from engine.errors import RenError

NLVR2_SCHEMA = pa.schema([("image_0", pa.binary()), ("image_1", pa.binary()), ("questions", writer.LIST_STRING),
                          ("answers", writer.LIST_STRING), ("identifier", writer.STRING)])

NLVR2_LABELS = ("True", "False")
_NLVR2_DATA_DIRS = ("", "data", "nlvr2/data")
_NLVR2_FROM = ("the NLVR2 release (github.com/lil-lab/nlvr, nlvr2/data/*.json: one JSON object per line) with its "
               "images in images/train/<directory>/, dev/ and test1/")
_NLVR2_REQUIRED = ("train", "dev", "test1")
_NLVR2_OPTIONAL = ("balanced_dev", "balanced_test1", "unbalanced_dev", "unbalanced_test1")


def _nlvr2_inputs(job: writer.Job, pending: Sequence[str], names: dict[str, str]) -> dict[str, Path]:
    """The JSON-lines file of each pending split; an optional split without one is reported unavailable."""
    inputs: dict[str, Path] = {}
    for split in pending:
        relative = f"{split.split('_')[0]}/{split}.json" if split in _NLVR2_OPTIONAL else f"{split}.json"
        candidates = tuple(str(Path(base) / relative) for base in _NLVR2_DATA_DIRS)
        if split in _NLVR2_REQUIRED:
            inputs[split] = read.find(job.source, job.task, candidates, _NLVR2_FROM)
        elif found := [job.source / c for c in candidates if (job.source / c).is_file()]:
            inputs[split] = found[0]
        else:
            job.report.unavailable.append(names[split])
    return inputs


def _nlvr2_output(job: writer.Job, name: str, path: Path, folders: dict[str, Path]) -> writer.Output:
    """One NLVR2 output: the sentences of ``path`` grouped per image pair; ``folders`` caches image folders."""
    task = job.task
    output = writer.Output(name, NLVR2_SCHEMA)
    pairs: dict[str, tuple[Path, list[str], list[str]]] = {}
    for number, record in read.read_jsonl(path, task):
        where = f"line {number}"
        identifier = read.field(record, "identifier", str, path, where, task)
        sentence = read.field(record, "sentence", str, path, where, task)
        label = read.field(record, "label", str, path, where, task)
        pair, separator, _ = identifier.rpartition("-")
        if not separator or not pair:
            raise RenError(f"{task}: {where} of {path} has 'identifier' = {identifier!r}, expected "
                           "split-set_id-pair_id-sentence_id (e.g. 'dev-850-0-0').")
        if label not in NLVR2_LABELS:
            output.skipped.append(writer.SkippedRecord(name, identifier, writer.UNKNOWN_LABEL,
                                                       f"label {label!r}, expected 'True' or 'False'"))
            continue
        if pair not in pairs:
            prefix = pair.split("-")[0]
            if prefix not in folders:
                candidates = ("images/train",) if prefix == "train" else (prefix, f"images/{prefix}")
                folders[prefix] = read.find(job.source, task, candidates, _NLVR2_FROM, folder=True)
            folder = folders[prefix]
            if prefix == "train":
                folder = folder / str(read.field(record, "directory", (int, str), path, where, task))
            pairs[pair] = (folder, [], [])
        pairs[pair][1].append(sentence)
        pairs[pair][2].append(label)
    for pair, (folder, sentences, labels) in pairs.items():
        images = (folder / f"{pair}-img0.png", folder / f"{pair}-img1.png")
        output.rows.append(writer.Row(pair, images, (sentences, labels, pair), len(sentences)))
    return output


def prepare_nlvr2(
    source: Path, out: Path, *, progress: writer.Progress | None = None, force: bool = False
) -> writer.PrepareReport:
    """NLVR2 (see docs/tasks-and-data.md); the balanced/unbalanced splits are written when their files exist."""
    names = {split: f"nlvr2_{split}.arrow" for split in (*_NLVR2_REQUIRED, *_NLVR2_OPTIONAL)}

    def outputs(job: writer.Job, pending: list[str]) -> list[writer.Output]:
        folders: dict[str, Path] = {}
        return [_nlvr2_output(job, names[split], path, folders)
                for split, path in _nlvr2_inputs(job, pending, names).items()]

    return writer.prepare_splits("nlvr2", source, out, progress, force, names, outputs)
