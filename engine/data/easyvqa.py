"""easy-VQA, the embedded default data set, and the caption corpus derived from it.

:func:`load_easy_vqa` decodes the package's PNGs once and caches them; :func:`easy_vqa_captions` gives every image
one colour and one shape, read from its questions and answers (where they leave it open, from the pixels:
:func:`read_colour_shape`), and three captions; :meth:`EasyVQA.run_split` holds out every :data:`VAL_EVERY`-th
training image as ``val``. How, step by step: docs/tasks-and-data.md, "easy-VQA and the caption corpus derived
from it".
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import easy_vqa
import numpy as np
from PIL import Image

from engine.store import follow_umask

CACHE_NAME = "easy_vqa_v1.npz"
SPLITS = ("train", "test")  # the package's splits, as cached
RUN_SPLITS = ("train", "val", "test")  # the splits a run trains, selects and tests on
VAL_EVERY = 10  # every 10th image of the package's train split is a validation image
IMAGE_SIZE = 64

SHAPES = ("circle", "rectangle", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "blue": (0, 0, 255),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "green": (0, 255, 0),
    "red": (255, 0, 0),
    "teal": (0, 128, 128),
    "yellow": (255, 255, 0),
}
_PALETTE_CODES = [(red << 16) | (green << 8) | blue for red, green, blue in PALETTE.values()]
CAPTION_TEMPLATES = (
    "a {colour} {shape}.",
    "a {shape} that is {colour}.",
    "the image shows a {colour} {shape}.",
)

_RECTANGLE_MIN_FILL = 0.9
_CIRCLE_MIN_SYMMETRY = 0.625
_NEGATIONS = frozenset({"not", "no"})


@dataclass(frozen=True, eq=False)
class VQASplit:
    """One split of easy-VQA.

    Attributes:
        images: ``(num_images, 64, 64, 3)`` uint8 RGB images.
        questions: The question texts.
        answer_ids: int64 index into :attr:`EasyVQA.answers`, one per question.
        image_index: int64 row in :attr:`images`, one per question.
    """

    images: np.ndarray
    questions: list[str]
    answer_ids: np.ndarray
    image_index: np.ndarray

    def subset(self, rows: np.ndarray) -> VQASplit:
        """The images at ``rows`` (ascending) with all their questions, image rows renumbered."""
        keep = np.isin(self.image_index, rows)
        return VQASplit(self.images[rows], [q for q, k in zip(self.questions, keep, strict=True) if k],
                        self.answer_ids[keep], np.searchsorted(rows, self.image_index[keep]).astype(np.int64))


@dataclass(frozen=True, eq=False)
class EasyVQA:
    """Both splits of easy-VQA and the 13 answers, in the package's order."""

    train: VQASplit
    test: VQASplit
    answers: list[str]

    def split(self, name: str) -> VQASplit:
        """Return the split called ``name`` ("train" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown easy-VQA split {name!r}; expected one of {SPLITS}")
        return self.train if name == "train" else self.test

    def run_split(self, name: str, *, hold_out_val: bool = True) -> VQASplit:
        """Return a run's split ``name``: "train" (the package's train split less the
        validation images, or all of it without ``hold_out_val``), "val" or "test" (see
        docs/tasks-and-data.md, "The validation split")."""
        package, rows = run_split_rows(self, name, hold_out_val=hold_out_val)
        return self.split(package).subset(rows)


def run_split_rows(data: EasyVQA, name: str, *, hold_out_val: bool = True) -> tuple[str, np.ndarray]:
    """The package split that a run's split ``name`` is drawn from, and its image rows (ascending).
    ``hold_out_val=False``: "train" is the whole package split, as for runs made before "val" existed
    (they evaluate on test), so that such a run resumes on the data it started on."""
    if name not in RUN_SPLITS:
        raise ValueError(f"unknown easy-VQA split {name!r}; expected one of {RUN_SPLITS}")
    if name == "test":
        return "test", np.arange(len(data.test.images))
    rows = np.arange(len(data.train.images))
    if name == "train" and not hold_out_val:
        return "train", rows
    is_val = rows % VAL_EVERY == VAL_EVERY - 1
    return "train", rows[is_val if name == "val" else ~is_val]


@dataclass(frozen=True, eq=False)
class CaptionCorpus:
    """Image-caption pairs for one split (see docs/tasks-and-data.md).

    Attributes:
        image_index: int64 row in the split's images, one per caption.
        texts: The captions.
        colours: Each image's colour, one per image.
        shapes: Each image's shape, one per image.
        from_pixels: bool, one per image: True where the annotations left the
            colour or the shape open and it was read from the pixels.
    """

    image_index: np.ndarray
    texts: list[str]
    colours: list[str]
    shapes: list[str]
    from_pixels: np.ndarray

    def meaning_keys(self) -> np.ndarray:
        """int64, one per caption: the colour x shape its image shows. The captions of one image say the
        same in three templates, and every image of that colour and shape has the same three: a text
        describes every image with its key (see :func:`engine.objectives.describes`)."""
        colours, shapes = list(PALETTE), list(SHAPES)
        per_image = np.array([colours.index(c) * len(shapes) + shapes.index(s)
                              for c, s in zip(self.colours, self.shapes, strict=True)], dtype=np.int64)
        return per_image[self.image_index]

    def subset(self, rows: np.ndarray) -> CaptionCorpus:
        """The captions of the images at ``rows`` (ascending), image rows renumbered."""
        keep = np.isin(self.image_index, rows)
        return CaptionCorpus(np.searchsorted(rows, self.image_index[keep]).astype(np.int64),
                             [t for t, k in zip(self.texts, keep, strict=True) if k],
                             [self.colours[r] for r in rows], [self.shapes[r] for r in rows], self.from_pixels[rows])


def load_easy_vqa(cache_dir: Path) -> EasyVQA:
    """Load easy-VQA, decoding the PNGs only when ``cache_dir`` has no usable cache.

    The decoded data are written to a temporary file in ``cache_dir`` and then
    renamed to ``easy_vqa_v1.npz``, so an interrupted write never leaves a
    broken cache. An unreadable cache is rebuilt.
    """
    cache_dir = Path(cache_dir)
    cache = cache_dir / CACHE_NAME
    if cache.is_file():
        try:
            return _read_cache(cache)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable cache: decode again and overwrite it below
    data = _decode_package()
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_cache(data, cache)
    return data


def read_colour_shape(image: np.ndarray) -> tuple[str, str]:
    """Read the colour and the shape of an easy-VQA image from its pixels.

    ``image`` is ``(H, W, 3)`` uint8 RGB. See step 4 of "How the captions are derived" in docs/tasks-and-data.md.
    """
    codes = _rgb_codes(image)
    counts = [int((codes == code).sum()) for code in _PALETTE_CODES]
    best = int(np.argmax(counts))
    if counts[best] == 0:
        raise ValueError("no pixel has an easy-VQA palette colour")
    mask = codes == _PALETTE_CODES[best]
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    if box.mean() >= _RECTANGLE_MIN_FILL:
        shape = "rectangle"
    elif min(_iou(box, box[::-1]), _iou(box, box[:, ::-1])) >= _CIRCLE_MIN_SYMMETRY:
        shape = "circle"
    else:
        shape = "triangle"
    return list(PALETTE)[best], shape


def easy_vqa_captions(data: EasyVQA, split: str) -> CaptionCorpus:
    """Derive the image-caption corpus of ``split`` (see docs/tasks-and-data.md)."""
    vqa = data.split(split)
    vocab = {"colour": tuple(PALETTE), "shape": SHAPES}
    kind_of = {word: kind for kind, words in vocab.items() for word in words}
    num_images = len(vqa.images)
    has: dict[str, list[set[str]]] = {kind: [set() for _ in range(num_images)] for kind in vocab}
    lacks: dict[str, list[set[str]]] = {kind: [set() for _ in range(num_images)] for kind in vocab}

    for question, answer_id, image in zip(
        vqa.questions, vqa.answer_ids.tolist(), vqa.image_index.tolist(), strict=True
    ):
        answer = data.answers[answer_id]
        words = re.findall(r"[a-z]+", question.lower())
        named = [word for word in words if word in kind_of]
        if answer in kind_of:
            facts, named = has, [answer, *named]
        elif answer in ("yes", "no"):
            negated = not _NEGATIONS.isdisjoint(words)
            facts = has if (answer == "yes") != negated else lacks
        else:
            raise ValueError(f"unexpected easy-VQA answer {answer!r} to {question!r}")
        for word in named:
            facts[kind_of[word]][image].add(word)

    values: dict[str, list[str]] = {kind: [] for kind in vocab}
    from_pixels = np.zeros(num_images, dtype=bool)
    for image in range(num_images):
        settled: dict[str, str | None] = {}
        for kind, words in vocab.items():
            positive, excluded = has[kind][image], lacks[kind][image]
            allowed = [word for word in words if word not in excluded]
            if len(positive) > 1 or not positive <= set(allowed):
                raise ValueError(
                    f"{split} image {image}: the annotations contradict each other about its "
                    f"{kind} (has {sorted(positive)}, lacks {sorted(excluded)})"
                )
            settled[kind] = next(iter(positive)) if positive else (allowed[0] if len(allowed) == 1 else None)
        if None in settled.values():
            from_pixels[image] = True
            read = dict(zip(("colour", "shape"), read_colour_shape(vqa.images[image]), strict=True))
            for kind, value in read.items():
                if settled[kind] is None and value in lacks[kind][image]:
                    raise ValueError(
                        f"{split} image {image}: its pixels show {kind} {value!r}, "
                        "which its annotations rule out"
                    )
                settled[kind] = settled[kind] or value
        for kind in vocab:
            values[kind].append(str(settled[kind]))

    texts = [
        template.format(colour=colour, shape=shape)
        for colour, shape in zip(values["colour"], values["shape"], strict=True)
        for template in CAPTION_TEMPLATES
    ]
    image_index = np.repeat(np.arange(num_images, dtype=np.int64), len(CAPTION_TEMPLATES))
    return CaptionCorpus(image_index, texts, values["colour"], values["shape"], from_pixels)


def run_split_captions(data: EasyVQA, name: str, *, hold_out_val: bool = True) -> tuple[VQASplit, CaptionCorpus]:
    """A run's split ``name`` (see :meth:`EasyVQA.run_split`) and its captions. Captions are derived
    from the whole package split, image by image, so a subset's captions are those of its images."""
    package, rows = run_split_rows(data, name, hold_out_val=hold_out_val)
    return data.split(package).subset(rows), easy_vqa_captions(data, package).subset(rows)


def _rgb_codes(rgb: np.ndarray) -> np.ndarray:
    """Pack the last (RGB) axis of a uint8 array into one int32 per pixel."""
    return rgb.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape."""
    return float((a & b).sum() / (a | b).sum())


def _decode_package() -> EasyVQA:
    """Read easy-VQA from the installed package, decoding every PNG."""
    answers = list(easy_vqa.get_answers())
    return EasyVQA(
        train=_decode_split(easy_vqa.get_train_questions, easy_vqa.get_train_image_paths, answers),
        test=_decode_split(easy_vqa.get_test_questions, easy_vqa.get_test_image_paths, answers),
        answers=answers,
    )


def _decode_split(
    get_questions: Callable[[], tuple[list[str], list[str], list[int]]],
    get_image_paths: Callable[[], dict[int, str]],
    answers: list[str],
) -> VQASplit:
    """Decode one split; image rows are in ascending image-id order."""
    texts, answer_texts, image_ids = get_questions()
    paths = get_image_paths()
    ids = sorted(paths)
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    answer_of = {answer: index for index, answer in enumerate(answers)}
    images = np.stack([_decode_png(paths[image_id]) for image_id in ids])
    return VQASplit(
        images=images,
        questions=list(texts),
        answer_ids=np.array([answer_of[a] for a in answer_texts], dtype=np.int64),
        image_index=np.array([row_of[i] for i in image_ids], dtype=np.int64),
    )


def _decode_png(path: str) -> np.ndarray:
    """Decode one PNG to a ``(64, 64, 3)`` uint8 RGB array."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"{path}: expected a {IMAGE_SIZE}x{IMAGE_SIZE} image, got {array.shape}")
    return array


def _read_cache(path: Path) -> EasyVQA:
    """Read a cache written by :func:`_write_cache`."""
    with np.load(path, allow_pickle=False) as arrays:
        splits = {
            name: VQASplit(
                images=arrays[f"{name}_images"],
                questions=arrays[f"{name}_questions"].tolist(),
                answer_ids=arrays[f"{name}_answer_ids"],
                image_index=arrays[f"{name}_image_index"],
            )
            for name in SPLITS
        }
        answers = arrays["answers"].tolist()
    return EasyVQA(train=splits["train"], test=splits["test"], answers=answers)


def _write_cache(data: EasyVQA, path: Path) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, then rename)."""
    arrays: dict[str, np.ndarray] = {"answers": np.array(data.answers)}
    for name in SPLITS:
        vqa = data.split(name)
        arrays[f"{name}_images"] = vqa.images
        arrays[f"{name}_questions"] = np.array(vqa.questions)
        arrays[f"{name}_answer_ids"] = vqa.answer_ids
        arrays[f"{name}_image_index"] = vqa.image_index
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            np.savez_compressed(file, **arrays)
        follow_umask(Path(temporary))  # mkstemp's 0600 would hide the cache from the other users of a store
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
