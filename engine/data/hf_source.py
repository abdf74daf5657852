"""Hugging Face ``datasets`` as a data source, read as ViLT's arrow rows.

:func:`open_hf` loads a split of the data set that ``[data.hf]`` names (a hub id or a local directory) and returns
an :class:`HFSource`, which the task datasets read exactly as they read an :class:`~engine.data.arrow.ArrowSource`.
Each HF row becomes a ViLT row holding its one example (one-caption rows are grouped per image), its columns mapped
over :data:`engine.config.HF_COLUMNS`. Rows, columns and conversions in full: docs/tasks-and-data.md, "Hugging Face
data sets as a source".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.config import HF_COLUMNS, HFDataConfig
from engine.data.arrow import ImageRows, _describe_schema, arrow_kind, list_lengths, type_matches
from engine.errors import RenError
from engine.vqa_answers import SOFT_SCORES, build_answer_vocab, normalize_answer, soft_score

if TYPE_CHECKING:
    import datasets

OPTIONAL = frozenset({"image_id", "multiple_choice_answer", "premise", "identifier"})  # may be absent
SNLI_LABELS = ("contradiction", "neutral", "entailment")  # by METER's label id
NLVR2_ANSWERS = ("False", "True")  # by label id
_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
_LISTED = 20


def _has(directory: Path, patterns: Sequence[str]) -> bool:
    return any(next(directory.glob(pattern), None) is not None for pattern in patterns)


def detect_format(path: str) -> str:
    """``disk``, ``parquet`` or ``imagefolder`` for a local directory (by the files
    each writes), ``hub`` for anything that is not a path on this machine."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        if directory.exists() or path.startswith((".", "/", "~")):
            raise RenError(f"data.hf.path = {path!r} is not a directory; a local Hugging Face data set is a "
                           "directory (save_to_disk output, parquet files or an imagefolder), anything else a hub id.")
        return "hub"
    if _has(directory, ("dataset_dict.json", "state.json")):
        return "disk"
    if _has(directory, [f"{prefix}{name}" for prefix in ("", "*/") for name in _METADATA]):
        return "imagefolder"
    if _has(directory, ("*.parquet", "*/*.parquet", "*/*/*.parquet")):
        return "parquet"
    names = sorted(entry.name for entry in directory.iterdir())
    listing = ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
    raise RenError(f"data.hf.path = {path!r} is a directory ren does not recognise as a Hugging Face data set: it "
                   "has no dataset_dict.json or state.json (save_to_disk), no *.parquet files and no metadata.jsonl/"
                   f"metadata.csv (imagefolder). It holds: {listing or 'nothing'}. Set data.hf.format if it is one.")


def _load(hf: HFDataConfig, fmt: str, split: str, cache_dir: Path | str | None) -> datasets.Dataset:
    """One split of the data set, memory-mapped."""
    import datasets

    cache = None if cache_dir is None else str(cache_dir)
    try:
        if fmt == "disk":
            loaded = datasets.load_from_disk(hf.path)
        elif fmt == "hub":
            return datasets.load_dataset(hf.path, hf.subset, split=split, cache_dir=cache)
        else:
            return datasets.load_dataset(fmt, data_dir=hf.path, split=split, cache_dir=cache)
    except (ValueError, KeyError, OSError, RuntimeError, datasets.exceptions.DatasetsError) as error:
        # RuntimeError: a hub data set that needs a loading script, which datasets 4 and later refuse
        raise RenError(f"Cannot load the split {split!r} of the Hugging Face data set {hf.path} (format {fmt}): "
                       f"{type(error).__name__}: {error}") from error
    if isinstance(loaded, datasets.Dataset):
        raise RenError(f"{hf.path} holds one saved Dataset without splits; save a DatasetDict (e.g. "
                       "DatasetDict({'train': ..., 'validation': ...}).save_to_disk(path)) so that data.train_split "
                       "and data.eval_split can name its splits.")
    if split not in loaded:
        raise RenError(f"The Hugging Face data set {hf.path} has no split {split!r}; its splits are "
                       f"{', '.join(loaded)} (data.train_split and data.eval_split name them; '+' joins them).")
    return loaded[split]


def open_hf(hf: HFDataConfig, kind: str, split: str, *, answers: Sequence[str] | None = None,
            cache_dir: Path | str | None = None) -> HFSource:
    """The rows of ``split`` (``"a+b"`` joins splits) of the data set ``hf`` names, read
    as ``kind``'s arrow layout. ``answers``: the VQAv2 vocabulary to label with (the
    training split's); when None a VQAv2 split builds its own. ``cache_dir``: the
    ``datasets`` cache (default its own, ``HF_DATASETS_CACHE``)."""
    fmt = detect_format(hf.path) if hf.format == "auto" else hf.format
    parts = [(part, _load(hf, fmt, part, cache_dir)) for part in split.split("+")]
    return HFSource(hf.path, parts, kind, hf.columns, answers=answers, answer_min_count=hf.answer_min_count)


def _wrap(values: pa.Array) -> pa.Array:
    """Each value as a one-element list."""
    return pa.ListArray.from_arrays(pa.array(np.arange(len(values) + 1, dtype=np.int32)), values)


def _lists(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


class HFSource(ImageRows):
    """The rows of one or more splits of the data set ``path`` (``parts``: each
    split's name and ``datasets.Dataset``) read as the arrow layout ``kind`` (see
    docs/tasks-and-data.md). ``columns`` overrides the default column mapping;
    ``answers`` and ``answer_min_count`` are :func:`open_hf`'s. :attr:`paths`
    name the splits for messages (``"HuggingFaceM4/VQAv2 [train]"``). The
    converted text columns live in memory; images are read from the data sets'
    memory-mapped tables. Pickles as the data sets (which ``datasets`` pickles as
    their files) and the converted columns."""

    def __init__(self, path: str, parts: Sequence[tuple[str, datasets.Dataset]], kind: str,
                 columns: Mapping[str, str] | None = None, *, answers: Sequence[str] | None = None,
                 answer_min_count: int = 9) -> None:
        self.kind = arrow_kind(kind)
        if not parts:
            raise RenError(f"No splits of the Hugging Face data set {path} were given for the {kind} data.")
        columns = dict(columns or {})
        self.splits = tuple(split for split, _ in parts)
        self.paths = tuple(f"{path} [{split}]" for split in self.splits)
        self.skipped_images = 0
        self._parts = [dataset for _, dataset in parts]
        self._part_starts = np.cumsum([0] + [len(dataset) for dataset in self._parts])
        self._mapping_key = "captions" if self.kind.text_column == "caption" else self.kind.name
        self.columns = {**HF_COLUMNS[self._mapping_key], **columns}
        unknown = sorted(set(columns) - set(HF_COLUMNS[self._mapping_key]))
        if unknown:
            raise RenError(f"data.hf.columns.{unknown[0]}: {self._mapping_key} has no column {unknown[0]!r}; the keys "
                           f"are {', '.join(HF_COLUMNS[self._mapping_key])}.")
        self._explicit = frozenset(columns)
        self.answers: list[str] | None = None  # VQAv2: the answer vocabulary the labels index
        self._hf_rows: np.ndarray | None = None  # HF row of each row, when rows are grouped by image
        self._image_kinds = {column: self._image_kind(column) for column in self.kind.image_columns}
        self._table = self._convert(answers, answer_min_count)
        self._images = self._image_arrays()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_images"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._images = self._image_arrays()

    def __len__(self) -> int:
        return self._table.num_rows

    # -- reading ---------------------------------------------------------------------------------------------------

    def _hf_row(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} is out of range for {len(self)} rows of {self.kind.name} data "
                             f"({', '.join(self.paths)})")
        return i if self._hf_rows is None else int(self._hf_rows[i])

    def locate(self, i: int) -> tuple[str, int]:
        """The split that holds row ``i`` and the row's index in that split of the HF data set."""
        return self._locate_hf(self._hf_row(i))

    def _locate_hf(self, row: int) -> tuple[str, int]:
        part = int(np.searchsorted(self._part_starts, row, side="right")) - 1
        return self.paths[part], row - int(self._part_starts[part])

    def column(self, name: str) -> pa.ChunkedArray:
        """One column of the layout over all rows (image columns as their encoded bytes: zero-copy,
        except for caption rows grouped by image, whose images are gathered into a copy)."""
        if name in self._images:
            images = self._images[name]
            if self._hf_rows is not None:
                images = images.take(pa.array(self._hf_rows))
            return pc.struct_field(images, "bytes") if self._image_kinds[name] == "struct" else images
        return self._table_column(name)

    def _table_column(self, name: str) -> pa.ChunkedArray:
        if name not in self._table.column_names:
            raise RenError(f"{', '.join(self.paths)}: the {self.kind.name} data read from Hugging Face has no column "
                           f"{name!r}; its columns are: {', '.join([*self._table.column_names, *self._images])}.")
        return self._table.column(name)

    def row(self, i: int, columns: Sequence[str]) -> dict[str, Any]:
        """Row ``i``'s cells in ``columns`` as Python values (image cells as bytes)."""
        self._hf_row(i)
        return {column: self._image_bytes(i, column) if column in self._images
                else self._table_column(column)[i].as_py() for column in columns}

    def _image_bytes(self, i: int, column: str) -> bytes | None:
        cell = self._images[column][self._hf_row(i)]
        if self._image_kinds[column] == "binary" or not cell.is_valid:
            return cell.as_py()
        data = cell["bytes"].as_py()
        if data is None and "path" in cell.type.names and cell["path"].is_valid:
            try:
                return Path(cell["path"].as_py()).read_bytes()
            except OSError:
                return None
        return data

    # -- columns of the HF data ------------------------------------------------------------------------------------

    def _where(self, key: str) -> str:
        default = "" if key in self._explicit else f", by default for {self._mapping_key}"
        return f"column {self.columns[key]!r} (data.hf.columns.{key}{default})"

    def _chunked(self, key: str) -> pa.ChunkedArray | None:
        """The HF column ``key`` maps to over all parts; None when it is optional and absent."""
        name = self.columns[key]
        missing = [index for index, part in enumerate(self._parts) if name not in part.column_names]
        if missing and not (key in OPTIONAL and key not in self._explicit and len(missing) == len(self._parts)):
            part = self._parts[missing[0]]
            raise RenError(f"{self.paths[missing[0]]}: the Hugging Face data set has no column {name!r}, which "
                           f"data.hf.columns.{key} names as the {self.kind.name} column {key!r}"
                           f"{'' if key in self._explicit else ' (the default mapping)'}. Its columns are: "
                           f"{_describe_schema(part.data.schema)}. Set data.hf.columns.{key} to the column that "
                           "holds it.")
        if missing:
            return None
        types = [part.data.schema.field(name).type for part in self._parts]
        if any(t != types[0] for t in types):
            raise RenError(f"{self._where(key)} has different types in {', '.join(self.paths)}: "
                           f"{', '.join(map(str, types))}; joined splits must agree.")
        return pa.chunked_array([chunk for part in self._parts for chunk in part.data.table.column(name).chunks],
                                type=types[0])

    def _required_chunked(self, key: str) -> pa.ChunkedArray:
        chunked = self._chunked(key)
        if chunked is None:
            raise AssertionError(f"{key!r} is not optional")  # _chunked returns None for OPTIONAL keys only
        return chunked

    def _column(self, key: str) -> pa.Array | None:
        chunked = self._chunked(key)
        return None if chunked is None else chunked.combine_chunks()

    def _required(self, key: str) -> pa.Array:
        return self._required_chunked(key).combine_chunks()

    def _type_error(self, key: str, column: pa.Array, expected: str) -> RenError:
        return RenError(f"{', '.join(self.paths)}: {self._where(key)} has type {column.type}, but the "
                        f"{self.kind.name} column {key!r} is read from {expected}.")

    def _no_nulls(self, key: str, column: pa.Array) -> None:
        if column.null_count:
            bad = np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))
            where, row = self._locate_hf(int(bad[0]))
            raise RenError(f"{where} row {row}: {self._where(key)} is empty (null); {len(bad)} of {len(column)} rows "
                           f"are. Every {self.kind.name} example needs its {key!r}.")

    def _class_names(self, key: str) -> list[str] | None:
        import datasets

        feature = self._parts[0].features.get(self.columns[key])
        return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def _image_kind(self, key: str) -> str:
        """``struct`` for an HF Image() column, ``binary`` for encoded bytes."""
        t = self._required_chunked(key).type
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and type_matches(t.field("bytes").type, "binary"):
            return "struct"
        if type_matches(t, "binary"):
            return "binary"
        raise RenError(f"{', '.join(self.paths)}: {self._where(key)} has type {t}, but images are read from an HF "
                       "Image() column (struct<bytes, path>) or a binary column of encoded images.")

    def _image_arrays(self) -> dict[str, pa.ChunkedArray]:
        return {column: self._required_chunked(column) for column in self._image_kinds}

    # -- conversion to the layout ----------------------------------------------------------------------------------

    def _wrapped(self, key: str) -> pa.Array:
        """A layout ``list<X>`` column from an HF column of X (wrapped) or of list<X> (kept)."""
        spec = self.kind.columns[key]
        column = self._required(key)
        if type_matches(column.type, spec):
            return column
        if not type_matches(column.type, spec[5:-1]):
            raise self._type_error(key, column, f"{spec[5:-1]} (one per row) or {spec}")
        self._no_nulls(key, column)
        return _wrap(column)

    def _scalar(self, key: str) -> pa.Array | None:
        spec = {**self.kind.columns, **self.kind.optional}[key]
        column = self._column(key)
        if column is None or type_matches(column.type, spec):
            return column
        if spec == "string" and pa.types.is_integer(column.type):
            return pc.cast(column, pa.string())
        raise self._type_error(key, column, spec)

    def _convert(self, answers: Sequence[str] | None, min_count: int) -> pa.Table:
        if self._mapping_key == "vqav2":
            columns = {"questions": self._wrapped("questions"), **self._vqa_answers(answers, min_count),
                       "question_id": self._wrapped("question_id"), "image_id": self._scalar("image_id")}
        elif self._mapping_key == "snli_ve":
            columns = {"sentences": self._pairs(), "labels": _wrap(self._snli_labels())}
        elif self._mapping_key == "nlvr2":
            columns = {"questions": self._wrapped("questions"), "answers": _wrap(self._nlvr2_answers()),
                       "identifier": self._identifiers()}
        elif self._mapping_key == "captions":
            columns = self._captions()
        else:
            columns = {"sentences": self._wrapped("sentences"), "bboxes": self._scalar("bboxes"),
                       "labels": self._scalar("labels")}
        return pa.table({name: column for name, column in columns.items() if column is not None})

    def _captions(self) -> dict[str, pa.Array | None]:
        """Captions per image: rows of one caption each are grouped by ``image_id`` when there is one."""
        caption, image_id = self._column("caption"), self._scalar("image_id")
        if caption is None or image_id is None or not type_matches(caption.type, "string"):
            return {"caption": self._wrapped("caption"), "image_id": image_id}
        self._no_nulls("caption", caption)
        self._no_nulls("image_id", image_id)
        codes = pc.dictionary_encode(image_id).indices.to_numpy(zero_copy_only=False)  # ids in first-seen order
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes)
        firsts = order[np.cumsum(counts) - counts]
        self._hf_rows = firsts
        return {"caption": _lists(np.concatenate([[0], np.cumsum(counts)]), caption.take(pa.array(order))),
                "image_id": image_id.take(pa.array(firsts))}

    def _pairs(self) -> pa.Array:
        """SNLI-VE ``sentences``: one [premise, hypothesis] pair per row."""
        hypothesis, premise = self._required("hypothesis"), self._column("premise")
        for key, column in (("hypothesis", hypothesis), ("premise", premise)):
            if column is not None and not type_matches(column.type, "string"):
                raise self._type_error(key, column, "string")
        self._no_nulls("hypothesis", hypothesis)
        n = len(hypothesis)
        premise = pa.repeat("", n) if premise is None else pc.fill_null(premise, "")
        both = pa.concat_arrays([pc.cast(premise, hypothesis.type), hypothesis])
        interleaved = both.take(pa.array(np.stack([np.arange(n), np.arange(n) + n], axis=1).ravel()))
        return _wrap(_lists(np.arange(0, 2 * n + 1, 2), interleaved))

    def _by_name(self, key: str, names: Sequence[str], targets: Sequence[str]) -> np.ndarray:
        """Target index of each name (case and surrounding spaces ignored); unknown names are an error."""
        index = {target.lower(): i for i, target in enumerate(targets)}
        ids = [index.get(str(name).strip().lower(), -1) for name in names]
        unknown = [name for name, i in zip(names, ids) if i < 0]
        if unknown:
            raise RenError(f"{', '.join(self.paths)}: {self._where(key)} holds {unknown[0]!r} (its values: "
                           f"{', '.join(map(repr, names[:_LISTED]))}), but {self.kind.name} {key} are "
                           f"{', '.join(map(repr, targets))}.")
        return np.asarray(ids, dtype=np.int64)

    def _snli_labels(self) -> pa.Array:
        """METER's label ids; an id no name maps to stays (the SNLI-VE dataset reports it)."""
        labels = self._required("labels")
        names = self._class_names("labels")
        if type_matches(labels.type, "string"):
            encoded = pc.dictionary_encode(labels)
            lookup = np.append(self._by_name("labels", encoded.dictionary.to_pylist(), SNLI_LABELS), -1)
            return pa.array(lookup[pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False)])
        if not pa.types.is_integer(labels.type):
            raise self._type_error("labels", labels, "METER's label ids (int), label names (string) or a ClassLabel")
        ids = pc.fill_null(labels, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        if names is None:
            return pa.array(ids)
        lookup = self._by_name("labels", names, SNLI_LABELS)
        valid = (ids >= 0) & (ids < len(lookup))
        return pa.array(np.where(valid, lookup[np.where(valid, ids, 0)], ids))

    def _nlvr2_answers(self) -> pa.Array:
        """``"True"``/``"False"`` per sentence; ids outside the names become null (the NLVR2 dataset reports it)."""
        answers = self._required("answers")
        if pa.types.is_boolean(answers.type):
            return pc.if_else(answers, NLVR2_ANSWERS[1], NLVR2_ANSWERS[0])
        if type_matches(answers.type, "string"):
            return answers
        if not pa.types.is_integer(answers.type):
            raise self._type_error("answers", answers, "\"True\"/\"False\" strings, booleans or 0/1")
        names = self._class_names("answers")
        lookup = pa.array(NLVR2_ANSWERS) if names is None else \
            pa.array(NLVR2_ANSWERS).take(pa.array(self._by_name("answers", names, NLVR2_ANSWERS)))
        ids = pc.fill_null(answers, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        valid = (ids >= 0) & (ids < len(lookup))
        return lookup.take(pa.array(np.where(valid, ids, 0), mask=~valid))

    def _identifiers(self) -> pa.Array:
        identifier = self._scalar("identifier")
        if identifier is not None:
            return identifier
        return pa.concat_arrays([
            pc.binary_join_element_wise(split, pc.cast(pa.array(np.arange(len(part))), pa.string()), "-")
            for split, part in zip(self.splits, self._parts)])

    def _vqa_answers(self, vocabulary: Sequence[str] | None, min_count: int) -> dict[str, pa.Array]:
        """``answers``, ``answer_labels`` and ``answer_scores`` as ViLT writes them (see docs/tasks-and-data.md)."""
        column = self._required_chunked("answers")  # not combined: only the answer strings are copied
        n = len(column)
        t = column.type
        if type_matches(t, "string"):
            flat, lengths = column, np.ones(n, dtype=np.int64)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            value = t.value_type
            flat, lengths = pc.list_flatten(column), list_lengths(column)
            if pa.types.is_struct(value) and value.get_field_index("answer") >= 0 \
                    and type_matches(value.field("answer").type, "string"):
                flat = pc.struct_field(flat, "answer")
            elif not (type_matches(value, "string") or pa.types.is_null(value)):
                raise self._type_error("answers", column, _ANSWER_TYPES)
        else:
            raise self._type_error("answers", column, _ANSWER_TYPES)
        flat = flat.combine_chunks()
        encoded = pc.dictionary_encode(flat.cast(pa.string()) if pa.types.is_null(flat.type) else flat)
        codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        parent = np.repeat(np.arange(n), lengths)[codes >= 0]  # the question of each (non-null) answer
        codes = codes[codes >= 0]
        normal_names, normal_of = np.unique(np.array([normalize_answer(a) for a in encoded.dictionary.to_pylist()],
                                                     dtype=object), return_inverse=True)
        normals = normal_of[codes]
        # (question, normalised answer) groups in first-seen order, with their sizes
        width = max(len(normal_names), 1)
        keys, firsts, counts = np.unique(parent * width + normals, return_index=True, return_counts=True)
        order = np.argsort(firsts, kind="stable")
        keys, firsts, counts = keys[order], firsts[order], counts[order]
        question, normal = keys // width, keys % width
        if vocabulary is None:
            vocabulary = self._vocabulary(encoded.dictionary.take(pa.array(codes[firsts])), question, counts,
                                          min_count)
        self.answers = list(vocabulary)
        index = {answer: i for i, answer in enumerate(vocabulary) if answer}
        label_of = np.array([index.get(name, -1) for name in normal_names], dtype=np.int64)
        labels = label_of[normal]
        kept = labels >= 0
        question, labels, counts = question[kept], labels[kept], counts[kept]
        table = np.array([soft_score(count) for count in range(len(SOFT_SCORES) + 1)])
        offsets = np.concatenate([[0], np.cumsum(np.bincount(question, minlength=n))])
        # as in ViLT's files, a question without answers (test splits) has no list at all, and an answered
        # one a list of its labels (empty when none is in the vocabulary)
        answered = np.bincount(parent, minlength=n) > 0
        rows = np.concatenate([[0], np.cumsum(answered)])

        def per_row(values: pa.Array) -> pa.Array:
            return _lists(rows, _lists(offsets, values).filter(pa.array(answered)))

        strings = pa.array(list(vocabulary), pa.string()).take(pa.array(labels, pa.int64()))
        raw = _lists(np.concatenate([[0], np.cumsum(lengths)]), flat.cast(pa.string()))  # as given, per question
        return {"answers": per_row(strings), "answer_labels": per_row(pa.array(labels, pa.int64())),
                "answer_scores": per_row(pa.array(table[np.minimum(counts, len(SOFT_SCORES))])),
                "raw_answers": _lists(rows, raw.filter(pa.array(answered)))}

    def _vocabulary(self, group_answers: pa.Array, question: np.ndarray, counts: np.ndarray,
                    min_count: int) -> list[str]:
        """ViLT's vocabulary over each question's majority answer. ``group_answers``, ``question`` and
        ``counts``: per (question, normalised answer) group in first-seen order, its first answer as
        written, its question and its size."""
        majority = self._column("multiple_choice_answer")
        if majority is None:  # each question's commonest normalised answer, the first seen on a tie
            pick = np.lexsort((np.arange(len(question)), -counts, question))
            starts = np.flatnonzero(np.r_[True, question[pick][1:] != question[pick][:-1]]) if len(pick) else pick
            majority = group_answers.take(pa.array(pick[starts], pa.int64()))
        elif not type_matches(majority.type, "string"):
            raise self._type_error("multiple_choice_answer", majority, "string")
        tally = pc.value_counts(majority.drop_null())
        vocabulary = build_answer_vocab(([answer] * count for answer, count in
                                         zip(tally.field("values").to_pylist(), tally.field("counts").to_pylist())),
                                        min_count)
        if not vocabulary:
            raise RenError(f"{', '.join(self.paths)}: no answer is the majority answer of {min_count} or more "
                           "questions, so the VQAv2 answer vocabulary is empty (is this a test split? lower "
                           "data.hf.answer_min_count for a small data set).")
        return vocabulary


_ANSWER_TYPES = "a list of {answer: string, ...} structs (HuggingFaceM4/VQAv2), a list of strings or a string"
