"""Reading the original files of a release: JSON, JSON lines and pickles, checked field by field; every
mistake a :class:`~engine.errors.RenError` naming the file, the record and the key."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.errors import RenError

FLICKR_DIRS = ("flickr30k-images", "Flickr30K/images")  # the Flickr30k images, for f30k_caption and snli_ve


def _require_source(source: Path, task: str, expected: str) -> None:
    if not source.is_dir():
        raise RenError(f"The {task} source folder {source} does not exist or is not a folder; it should hold "
                       f"{expected}.")


def find(source: Path, task: str, candidates: Sequence[str], expected: str, *, folder: bool = False) -> Path:
    """The first of ``source / candidate`` that exists (as a folder when ``folder``); else a RenError."""
    _require_source(source, task, expected)
    for candidate in candidates:
        path = source / candidate
        if path.is_dir() if folder else path.is_file():
            return path
    kind = "image folder" if folder else "input file"
    looked = " or ".join(str(source / candidate) for candidate in candidates)
    raise RenError(f"{task}: the {kind} {Path(candidates[0]).name}{'/' if folder else ''} is missing (looked for "
                   f"{looked}). {task} is prepared from {expected}.")


def read_json(path: Path, task: str) -> Any:
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise RenError(f"{task}: {path} is not valid JSON (line {error.lineno}, column {error.colno}: "
                       f"{error.msg}).") from None
    except UnicodeDecodeError as error:
        raise RenError(f"{task}: {path} is not UTF-8 text ({error}).") from None


def read_jsonl(path: Path, task: str) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` for each non-blank line of the JSON-lines file ``path``."""
    try:
        with path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise RenError(f"{task}: line {number} of {path} is not valid JSON (column {error.colno}: "
                                   f"{error.msg}); the file holds one JSON object per line.") from None
    except UnicodeDecodeError as error:
        raise RenError(f"{task}: {path} is not UTF-8 text ({error}).") from None


TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def field(record: Any, key: str, kinds: type | tuple[type, ...], path: Path, where: str, task: str) -> Any:
    """``record[key]``, checked to exist and to be of ``kinds``; ``where`` names the record in messages."""
    if not isinstance(record, dict):
        expected = "a dict" if path.suffix == ".p" else "a JSON object"
        raise RenError(f"{task}: {where} of {path} is {TYPE_NAMES.get(type(record), type(record).__name__)}, "
                       f"expected {expected}.")
    if key not in record:
        keys = ", ".join(map(repr, list(record)[:12])) or "none"
        raise RenError(f"{task}: {where} of {path} has no key {key!r} (its keys: {keys}).")
    value = record[key]
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, allowed) or isinstance(value, bool):
        expected = " or ".join(TYPE_NAMES.get(kind, kind.__name__) for kind in allowed)
        raise RenError(f"{task}: {where} of {path} has {key!r} = {str(value)[:80]!r}, expected {expected}.")
    return value


def top_list(content: Any, key: str, path: Path, task: str) -> list[Any]:
    if not isinstance(content, dict) or not isinstance(content.get(key), list):
        raise RenError(f"{task}: {path} has no top-level list {key!r}; expected the original layout "
                       f"{{{key!r}: [...], ...}}.")
    return content[key]


def numbers(value: Any, count: int, path: Path, where: str, task: str, meaning: str) -> list[float]:
    """``value`` as ``count`` floats; else a RenError saying it should be ``meaning``."""
    if not isinstance(value, list) or len(value) != count or not all(
            isinstance(number, (int, float)) and not isinstance(number, bool) for number in value):
        raise RenError(f"{task}: {where} of {path} is {str(value)[:80]!r}, expected {meaning}.")
    return [float(number) for number in value]


_PICKLE_TYPES = {"dict": dict, "list": list, "tuple": tuple, "str": str, "unicode": str, "int": int, "long": int,
                 "float": float}


class _ForbiddenGlobal(Exception):
    """A class or function named in a pickle that :class:`_DataUnpickler` does not build."""


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that builds only lists, dicts, tuples, strings and numbers: any other class or function a
    pickle names (which unpickling would call, so it could run any code) raises :class:`_ForbiddenGlobal`."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _PICKLE_TYPES:
            return _PICKLE_TYPES[name]
        raise _ForbiddenGlobal(f"{module}.{name}")


def _decoded(value: Any) -> Any:
    """``value`` with its byte strings (Python 2's ``str``) decoded as UTF-8, or Latin-1 where not UTF-8."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, (list, tuple)):
        return type(value)(_decoded(item) for item in value)
    if isinstance(value, dict):
        return {_decoded(key): _decoded(item) for key, item in value.items()}
    return value


def read_pickle(path: Path, task: str) -> Any:
    """The content of the pickle ``path`` (Python 2 byte strings decoded, see :func:`_decoded`), data types only."""
    try:
        with path.open("rb") as file:
            return _decoded(_DataUnpickler(file, encoding="bytes").load())
    except _ForbiddenGlobal as forbidden:
        raise RenError(f"{task}: {path} refers to {forbidden}; the pickle should hold only lists, dicts, strings and "
                       "numbers, and anything else is refused because unpickling it could run code.") from None
    except OSError as error:
        raise RenError(f"{task}: cannot read {path}: {error.strerror or error}.") from None
    except Exception as error:  # a corrupt pickle raises UnpicklingError, EOFError, ValueError, KeyError, ...
        raise RenError(f"{task}: {path} is not a readable pickle ({type(error).__name__}: {error}); it should be the "
                       "file of the original release.") from None


def json_list(path: Path, task: str, expected: str) -> list[Any]:
    """The content of the JSON file ``path``, which must be a list (``expected`` says of what)."""
    content = read_json(path, task)
    if not isinstance(content, list):
        raise RenError(f"{task}: {path} holds {TYPE_NAMES.get(type(content), type(content).__name__)}, expected a "
                       f"JSON list of {expected}.")
    return content
