"""SNLI-VE (METER) and NLVR2 (ViLT) from arrow files written in their exact layouts."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from engine.data.arrow import open_split
from engine.data.datasets import identity_collate
from engine.data.images import image_transform
from engine.data.nlvr2 import ArrowNLVR2Dataset
from engine.data.snli_ve import LABELS, ArrowSNLIVEDataset
from engine.data.tokenizer import build_word_tokenizer
from engine.data.transforms import HALF, NORMS, Normalization
from engine.errors import RenError

from .arrow_fixtures import WORDS, write_arrow_table, write_nlvr2, write_snli_ve

SIZE = 32


@pytest.fixture(scope="module")
def tokenizer():
    """Knows every word the fixture writers use, so decoding gives the text back."""
    return build_word_tokenizer(WORDS)


def _decode(tokenizer, input_ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in input_ids]


def _rewrite(written_path: Path, target: Path, column: str, row: int, value: object) -> Path:
    """A copy of an arrow file, same schema, with one cell of ``column`` replaced."""
    table = pa.ipc.open_file(pa.memory_map(str(written_path))).read_all()
    cells = table.column(column).to_pylist()
    cells[row] = value
    index = table.schema.get_field_index(column)
    table = table.set_column(index, table.schema.field(index), pa.array(cells, type=table.schema.field(index).type))
    return write_arrow_table(target / written_path.name, table)


def test_snli_items_are_hypotheses_with_meter_labels(tmp_path: Path, tokenizer) -> None:
    written = write_snli_ve(tmp_path, "train", n=5)
    source = open_split(tmp_path, "snli_ve", "train")
    transform = image_transform(SIZE, train=False)
    norm = Normalization(*NORMS["imagenet"], source="imagenet")
    dataset = ArrowSNLIVEDataset(source, tokenizer, 16, transform, norm)
    assert len(dataset) == 5 * 3  # three [premise, hypothesis] pairs per image
    indices = [0, 1, 2, 4, 14]
    batch = dataset.__getitems__(indices)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "labels", "items"}
    assert batch["pixel_values"].shape == (5, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 5
    assert batch["labels"].dtype == torch.int64
    places = [(0, 0), (0, 1), (0, 2), (1, 1), (4, 2)]
    stored = [source.row(row, ("sentences", "labels")) for row, _ in places]
    assert batch["labels"].tolist() == [cells["labels"][slot] for cells, (_, slot) in zip(stored, places)]
    assert batch["labels"].tolist() == [written.rows[row]["labels"][slot] for row, slot in places]
    hypotheses = [cells["sentences"][slot][1] for cells, (_, slot) in zip(stored, places)]
    premises = [cells["sentences"][slot][0] for cells, (_, slot) in zip(stored, places)]
    assert _decode(tokenizer, batch["input_ids"]) == hypotheses and hypotheses != premises
    expected = norm.apply(torch.stack([transform(source.image(row)) for row, _ in places]))
    assert torch.equal(batch["pixel_values"], expected)
    assert LABELS[2] == "entailment" and LABELS[0] == "contradiction"  # METER's write_snli.py label2id


def test_snli_joins_splits_and_drops_pairs_of_unreadable_images(tmp_path: Path, tokenizer) -> None:
    dev = write_snli_ve(tmp_path, "dev", n=3, start=5, corrupt=(6,))  # the second image
    test = write_snli_ve(tmp_path, "test", n=2, start=8, rows_per_batch=1)
    source = open_split(tmp_path, "snli_ve", "dev+test")
    assert source.paths == (dev.path, test.path) and len(source) == 5
    dataset = ArrowSNLIVEDataset(source, tokenizer, 16, image_transform(SIZE, train=True), HALF)
    assert len(dataset) == 5 * 3
    batch = dataset.__getitems__(list(range(len(dataset))))
    readable = [row for row in dev.rows + test.rows if row is not dev.rows[1]]
    assert batch["labels"].tolist() == [label for row in readable for label in row["labels"]]
    assert _decode(tokenizer, batch["input_ids"]) == [pair[1] for row in readable for pair in row["sentences"]]
    assert source.skipped_images == 1  # decoded once for its three pairs
    loader = DataLoader(dataset, batch_size=4, collate_fn=identity_collate, num_workers=0)
    sizes = [len(b["labels"]) for b in loader]
    assert sum(sizes) == 12 and source.skipped_images == 3  # the batches [0..3] and [4..7] each read it
    with pytest.raises(RenError, match="unreadable.*snli_dev.arrow"):
        dataset.__getitems__([3, 4, 5])


@pytest.mark.parametrize(("labels", "shown"), [([0, 3, 1], "labels\\[1\\] = 3"), ([2, 1, -1], "labels\\[2\\] = -1"),
                                               ([0, None, 1], "labels\\[1\\] = None")])
def test_snli_labels_outside_the_three_classes_are_refused(tmp_path: Path, tokenizer, labels: list,
                                                           shown: str) -> None:
    written = write_snli_ve(tmp_path / "good", "train", n=4)
    bad = _rewrite(written.path, tmp_path / "bad", "labels", 2, labels)
    source = open_split(bad.parent, "snli_ve", "train")
    with pytest.raises(RenError, match=rf"{re.escape(str(bad))} row 2: {shown} is not an SNLI-VE label id.*1 of 12"):
        ArrowSNLIVEDataset(source, tokenizer, 16, image_transform(SIZE, train=False), HALF)


def test_snli_rows_must_pair_every_sentence_with_a_label(tmp_path: Path, tokenizer) -> None:
    written = write_snli_ve(tmp_path / "good", "train", n=4)
    bad = _rewrite(written.path, tmp_path / "bad", "labels", 3, [0, 1])
    with pytest.raises(RenError, match=rf"{re.escape(str(bad))} row 3: 3 sentence pairs but 2 labels"):
        ArrowSNLIVEDataset(open_split(bad.parent, "snli_ve", "train"), tokenizer, 16,
                           image_transform(SIZE, train=False), HALF)
    pairs = [["a premise", "a hypothesis"], ["a premise", "another hypothesis"], ["only a premise"]]
    bad = _rewrite(written.path, tmp_path / "bad_pairs", "sentences", 1, pairs)
    with pytest.raises(RenError, match=r"row 1: sentences\[2\] = \['only a premise'\] is not a \[premise, hyp"):
        ArrowSNLIVEDataset(open_split(bad.parent, "snli_ve", "train"), tokenizer, 16,
                           image_transform(SIZE, train=False), HALF)


def test_nlvr2_items_are_sentences_about_two_images(tmp_path: Path, tokenizer) -> None:
    written = write_nlvr2(tmp_path, "train", n=4)
    source = open_split(tmp_path, "nlvr2", "train")
    transform = image_transform(SIZE, train=False)
    dataset = ArrowNLVR2Dataset(source, tokenizer, 24, transform, HALF)
    assert len(dataset) == 4 * 2  # two sentences per image pair
    batch = dataset.__getitems__([1, 2, 3, 6])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values_0", "pixel_values_1", "labels", "identifiers",
                          "items"}
    for key in ("pixel_values_0", "pixel_values_1"):
        assert batch[key].shape == (4, 3, SIZE, SIZE) and batch[key].dtype == torch.float32
    places = [(0, 1), (1, 0), (1, 1), (3, 0)]
    stored = [source.row(row, ("questions", "answers")) for row, _ in places]
    questions = [cells["questions"][slot] for cells, (_, slot) in zip(stored, places)]
    answers = [cells["answers"][slot] for cells, (_, slot) in zip(stored, places)]
    assert batch["labels"].dtype == torch.int64
    assert batch["labels"].tolist() == [int(answer == "True") for answer in answers]
    assert sorted(set(batch["labels"].tolist())) == [0, 1]
    assert batch["identifiers"] == [f"{written.rows[row]['identifier']}#{slot}" for row, slot in places]
    assert _decode(tokenizer, batch["input_ids"]) == questions
    for key, column in (("pixel_values_0", "image_0"), ("pixel_values_1", "image_1")):
        expected = HALF.apply(torch.stack([transform(source.image(row, column)) for row, _ in places]))
        assert torch.equal(batch[key], expected)
    assert not torch.equal(batch["pixel_values_0"], batch["pixel_values_1"])


def test_nlvr2_joins_splits_and_drops_sentences_of_unreadable_pairs(tmp_path: Path, tokenizer) -> None:
    dev = write_nlvr2(tmp_path, "dev", n=3, corrupt=(1,))
    test1 = write_nlvr2(tmp_path, "test1", n=2, start=3, rows_per_batch=1)
    source = open_split(tmp_path, "nlvr2", "dev+test1")
    assert source.paths == (dev.path, test1.path)
    dataset = ArrowNLVR2Dataset(source, tokenizer, 24, image_transform(SIZE, train=True), HALF)
    assert len(dataset) == 5 * 2
    batch = dataset.__getitems__(list(range(len(dataset))))
    readable = [dev.rows[0], dev.rows[2], *test1.rows]
    assert batch["identifiers"] == [f"{row['identifier']}#{k}" for row in readable for k in range(2)]
    assert batch["identifiers"][0].startswith("dev-") and batch["identifiers"][-1].startswith("test1-")
    assert batch["labels"].tolist() == [int(answer == "True") for row in readable for answer in row["answers"]]
    assert batch["pixel_values_0"].shape[0] == batch["pixel_values_1"].shape[0] == 8
    assert source.skipped_images == 1  # one count for the pair, read once for both its sentences
    loader = DataLoader(dataset, batch_size=3, collate_fn=identity_collate, num_workers=1)
    assert [i for b in loader for i in b["identifiers"]] == batch["identifiers"]  # through a worker process
    with pytest.raises(RenError, match="No nlvr2 arrow file for the split 'balanced_dev'"):
        open_split(tmp_path, "nlvr2", "dev+balanced_dev")


@pytest.mark.parametrize("answer", ["maybe", "true", None])
def test_nlvr2_answers_other_than_true_and_false_are_refused(tmp_path: Path, tokenizer, answer: str | None) -> None:
    written = write_nlvr2(tmp_path / "good", "dev", n=3)
    bad = _rewrite(written.path, tmp_path / "bad", "answers", 1, ["True", answer])
    where = re.escape(f"{bad} row 1 (dev-1-0): answers[1] = {answer!r}, but NLVR2 answers")
    with pytest.raises(RenError, match=where):
        ArrowNLVR2Dataset(open_split(bad.parent, "nlvr2", "dev"), tokenizer, 24,
                          image_transform(SIZE, train=False), HALF)
    bad = _rewrite(written.path, tmp_path / "short", "answers", 2, ["True"])
    with pytest.raises(RenError, match=rf"{re.escape(str(bad))} row 2: 2 sentences but 1 answers"):
        ArrowNLVR2Dataset(open_split(bad.parent, "nlvr2", "dev"), tokenizer, 24,
                          image_transform(SIZE, train=False), HALF)
