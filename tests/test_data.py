"""engine.data: easy-VQA loading and caching, captions, tokenizers and datasets."""

from __future__ import annotations

import re
from pathlib import Path

import easy_vqa
import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from engine.data import easyvqa
from engine.data.datasets import CaptionDataset, VQADataset, identity_collate
from engine.data.easyvqa import (
    CACHE_NAME,
    CAPTION_TEMPLATES,
    PALETTE,
    SHAPES,
    CaptionCorpus,
    EasyVQA,
    easy_vqa_captions,
    load_easy_vqa,
    read_colour_shape,
    run_split_captions,
    run_split_rows,
)
from engine.data.tokenizer import build_word_tokenizer, load_tokenizer
from engine.errors import ModelLoadError
from tests.helpers.paths import PRESETS


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("easy_vqa_cache")


@pytest.fixture(scope="session")
def data(cache_dir: Path) -> EasyVQA:
    """The real easy-VQA, decoded once per test session."""
    return load_easy_vqa(cache_dir)


@pytest.fixture(scope="session")
def captions(data: EasyVQA) -> dict[str, CaptionCorpus]:
    return {split: easy_vqa_captions(data, split) for split in ("train", "test")}


@pytest.fixture(scope="session")
def tokenizer(data: EasyVQA, captions: dict[str, CaptionCorpus]):
    return build_word_tokenizer(data.train.questions + data.test.questions + captions["train"].texts)


@pytest.fixture(scope="session")
def vqa_test_set(data: EasyVQA, tokenizer) -> VQADataset:
    test = data.test
    return VQADataset(test.images, test.image_index, test.questions, test.answer_ids, 13, tokenizer, 32, 64)


def _same_data(a: EasyVQA, b: EasyVQA) -> bool:
    return a.answers == b.answers and all(
        np.array_equal(x.images, y.images)
        and x.questions == y.questions
        and np.array_equal(x.answer_ids, y.answer_ids)
        and np.array_equal(x.image_index, y.image_index)
        for x, y in ((a.train, b.train), (a.test, b.test))
    )


# --- easy-VQA ---------------------------------------------------------------------------------


def test_official_split_sizes_and_contents(data: EasyVQA) -> None:
    assert data.answers == easy_vqa.get_answers() and len(data.answers) == 13
    for split, num_questions, num_images, package in (
        ("train", 38_575, 4_000, easy_vqa.get_train_questions()),
        ("test", 9_673, 1_000, easy_vqa.get_test_questions()),
    ):
        vqa = data.split(split)
        assert len(vqa.questions) == len(vqa.answer_ids) == len(vqa.image_index) == num_questions
        assert vqa.images.shape == (num_images, 64, 64, 3) and vqa.images.dtype == np.uint8
        assert vqa.answer_ids.dtype == vqa.image_index.dtype == np.int64
        assert 0 <= vqa.image_index.min() and vqa.image_index.max() == num_images - 1
        texts, answers, image_ids = package
        assert vqa.questions == texts
        assert [data.answers[i] for i in vqa.answer_ids] == answers
    with PIL.Image.open(easy_vqa.get_test_image_paths()[7]) as png:
        assert np.array_equal(data.test.images[7], np.asarray(png.convert("RGB")))
    with pytest.raises(ValueError, match="unknown easy-VQA split"):
        data.split("validation")


def test_validation_split_holds_out_whole_images_of_the_train_split(data: EasyVQA) -> None:
    train, val, test = (data.run_split(name) for name in ("train", "val", "test"))
    assert (len(train.images), len(val.images), len(test.images)) == (3_600, 400, 1_000)
    (_, train_rows), (_, val_rows) = (run_split_rows(data, name) for name in ("train", "val"))
    assert val_rows.tolist() == list(range(9, 4_000, 10))  # the documented, fixed choice
    assert not set(train_rows) & set(val_rows) and len(set(train_rows) | set(val_rows)) == 4_000
    for split, rows in ((train, train_rows), (val, val_rows)):
        on_side = np.isin(data.train.image_index, rows)  # every question of each image goes with the image
        assert split.questions == [q for q, keep in zip(data.train.questions, on_side, strict=True) if keep]
        assert np.array_equal(split.answer_ids, data.train.answer_ids[on_side])
        assert np.array_equal(split.images[split.image_index], data.train.images[data.train.image_index[on_side]])
    assert len(train.questions) + len(val.questions) == len(data.train.questions) == 38_575
    assert np.array_equal(test.images, data.test.images) and test.questions == data.test.questions
    with pytest.raises(ValueError, match="unknown easy-VQA split"):
        data.run_split("validation")


@pytest.mark.parametrize("preset", ["quickstart.toml", "easyvqa_pretrain.toml"])
def test_a_run_that_evaluates_on_test_trains_on_the_whole_train_split(preset: str, cache_dir: Path) -> None:
    """Runs made before "val" existed store eval_split = "test" and trained on all 4,000 train images;
    resumed, they must see that data again. New runs train on the 3,600 images "val" leaves."""
    from engine.config import load_preset
    from engine.data.pipeline import build_data

    sizes = {}
    for split in ("val", "test"):
        cfg = load_preset(PRESETS / preset, [f'data.eval_split="{split}"'])
        sizes[split] = len(build_data(cfg, cache_dir=cache_dir).train)
    whole = 38_575 if preset == "quickstart.toml" else 3 * 4_000  # questions, or three captions per image
    assert sizes == {"val": whole - (3_892 if preset == "quickstart.toml" else 3 * 400), "test": whole}


def test_caption_meaning_keys_join_paraphrases_and_images_of_one_colour_and_shape(
        captions: dict[str, CaptionCorpus]) -> None:
    corpus = captions["train"]
    keys = corpus.meaning_keys()
    meaning = [(corpus.colours[i], corpus.shapes[i]) for i in corpus.image_index]
    assert len(keys) == len(corpus.texts) == 12_000
    assert len(set(keys.tolist())) == len(set(meaning)) <= 24
    pairs = np.random.default_rng(0).integers(0, len(keys), size=(20_000, 2))
    for a, b in pairs:  # equal keys exactly where the captions say the same colour and shape
        assert (keys[a] == keys[b]) == (meaning[a] == meaning[b])


def test_validation_captions_are_those_of_its_images(data: EasyVQA, captions: dict[str, CaptionCorpus]) -> None:
    val, corpus = run_split_captions(data, "val")
    whole = captions["train"]
    assert len(val.images) == 400 and len(corpus.texts) == 1_200
    assert corpus.texts == [t for t, i in zip(whole.texts, whole.image_index, strict=True) if i % 10 == 9]
    assert corpus.colours == whole.colours[9::10] and corpus.shapes == whole.shapes[9::10]
    assert np.array_equal(corpus.image_index, np.repeat(np.arange(400), 3))


def test_cache_is_reused_without_decoding_pngs(data: EasyVQA, cache_dir: Path, monkeypatch) -> None:
    assert (cache_dir / CACHE_NAME).is_file()
    assert [p.name for p in cache_dir.iterdir()] == [CACHE_NAME]  # no temporary file left behind

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached load must not decode PNGs")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    assert _same_data(load_easy_vqa(cache_dir), data)


def test_stale_temp_file_and_broken_cache_are_recovered_from(data: EasyVQA, tmp_path: Path, monkeypatch) -> None:
    decodes = []
    monkeypatch.setattr(easyvqa, "_decode_package", lambda: decodes.append(1) or data)
    (tmp_path / f".{CACHE_NAME}.killed.tmp").write_bytes(b"PK\x03\x04 half-written")
    (tmp_path / CACHE_NAME).write_bytes(b"not a zip file")

    assert _same_data(load_easy_vqa(tmp_path), data) and len(decodes) == 1
    assert _same_data(load_easy_vqa(tmp_path), data) and len(decodes) == 1  # the rebuilt cache is read


def test_interrupted_cache_write_leaves_no_cache(data: EasyVQA, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(easyvqa, "_decode_package", lambda: data)

    def killed(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", killed)
    with pytest.raises(KeyboardInterrupt):
        load_easy_vqa(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


# --- captions ---------------------------------------------------------------------------------


def test_every_image_gets_one_colour_and_shape_consistent_with_all_its_annotations(
    data: EasyVQA, captions: dict[str, CaptionCorpus]
) -> None:
    for split in ("train", "test"):
        vqa, corpus = data.split(split), captions[split]
        assert len(corpus.colours) == len(corpus.shapes) == len(vqa.images)
        assert set(corpus.colours) == set(PALETTE) and set(corpus.shapes) == set(SHAPES)
        for question, answer_id, image in zip(vqa.questions, vqa.answer_ids, vqa.image_index, strict=True):
            answer, truth = data.answers[answer_id], {corpus.colours[image], corpus.shapes[image]}
            words = re.findall(r"[a-z]+", question)
            named = [w for w in words if w in PALETTE or w in SHAPES]
            if answer in ("yes", "no"):
                negated = "not" in words or "no" in words
                assert ((answer == "yes") != negated) == (named[0] in truth), (split, question, answer, truth)
            else:
                assert {answer, *named} <= truth, (split, question, answer, truth)


def test_pixel_reading_agrees_with_annotations_wherever_they_settle_it(
    data: EasyVQA, captions: dict[str, CaptionCorpus]
) -> None:
    for split, expected_from_pixels in (("train", 422), ("test", 112)):
        images, corpus = data.split(split).images, captions[split]
        assert int(corpus.from_pixels.sum()) == expected_from_pixels  # as docs/tasks-and-data.md says
        for image in np.flatnonzero(~corpus.from_pixels):
            assert read_colour_shape(images[image]) == (corpus.colours[image], corpus.shapes[image])


def test_captions_follow_the_templates_and_are_deterministic(
    data: EasyVQA, captions: dict[str, CaptionCorpus]
) -> None:
    corpus = captions["train"]
    assert corpus.texts[:3] == ["a blue rectangle.", "a rectangle that is blue.", "the image shows a blue rectangle."]
    for split in ("train", "test"):
        corpus = captions[split]
        num_images = len(data.split(split).images)
        assert len(corpus.texts) == len(corpus.image_index) == num_images * len(CAPTION_TEMPLATES)
        assert corpus.image_index.dtype == np.int64
        assert np.array_equal(np.bincount(corpus.image_index), np.full(num_images, len(CAPTION_TEMPLATES)))
        for text, image in zip(corpus.texts, corpus.image_index, strict=True):
            words = text.rstrip(".").split()
            assert corpus.colours[image] in words and corpus.shapes[image] in words
        again = easy_vqa_captions(data, split)
        assert again.texts == corpus.texts and np.array_equal(again.image_index, corpus.image_index)
        assert again.colours == corpus.colours and again.shapes == corpus.shapes


# --- tokenizers -------------------------------------------------------------------------------


def test_word_tokenizer_encodes_decodes_and_aligns_words() -> None:
    tokenizer = build_word_tokenizer(["What color is the shape?", "a red circle."])
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    words = sorted(w for w in vocab if not w.startswith("["))
    assert [vocab[w] for w in words] == list(range(5, 5 + len(words)))
    assert tokenizer.pad_token_id == 0 and tokenizer.mask_token_id == 4 and tokenizer.is_fast

    encoding = tokenizer(["What color is the shape?", "a red circle.", "a blue circle"], padding=True)
    tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"][0])
    assert tokens == ["[CLS]", "what", "color", "is", "the", "shape", "?", "[SEP]"]
    assert tokenizer.decode(encoding["input_ids"][0], skip_special_tokens=True) == "what color is the shape?"
    assert encoding["input_ids"][1][-2:] == [0, 0] and encoding["attention_mask"][1][-2:] == [0, 0]
    assert encoding.word_ids(1) == [None, 0, 1, 2, 3, None, None, None]
    assert encoding["input_ids"][2][2] == tokenizer.unk_token_id  # "blue" is not in the vocabulary

    truncated = tokenizer("what color is the shape?", truncation=True, max_length=4)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(truncated) == ["[CLS]", "what", "color", "[SEP]"]


def test_word_tokenizer_vocabulary_is_deterministic_and_casing_optional() -> None:
    texts = ["a Red circle.", "is there a triangle?"]
    assert build_word_tokenizer(texts).get_vocab() == build_word_tokenizer(texts[::-1]).get_vocab()
    cased = build_word_tokenizer(texts, lowercase=False)
    assert "Red" in cased.get_vocab() and "red" not in cased.get_vocab()
    assert "red" in build_word_tokenizer(texts).get_vocab()


def test_tokenizer_save_and_load_round_trip(tokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    texts = ["what is the red shape?", "the image shows a teal triangle."]
    assert loaded.is_fast and loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded(texts, padding=True)["input_ids"] == tokenizer(texts, padding=True)["input_ids"]
    assert loaded(texts).word_ids(1) == tokenizer(texts).word_ids(1)
    assert (loaded.pad_token_id, loaded.mask_token_id) == (0, 4)


def test_load_tokenizer_reports_a_missing_directory(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(ModelLoadError) as error:
        load_tokenizer(missing)
    message = str(error.value)
    assert missing in message and "does not exist" in message and 'model.text.name = "/path/to/dir"' in message
    assert "\n" not in message

    with pytest.raises(ModelLoadError, match="holds no loadable tokenizer"):
        load_tokenizer(str(tmp_path))


# --- datasets ---------------------------------------------------------------------------------


def test_vqa_batches(data: EasyVQA, vqa_test_set: VQADataset, tokenizer) -> None:
    loader = DataLoader(vqa_test_set, batch_size=16, shuffle=True, collate_fn=identity_collate)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "labels", "answer_ids", "image_ids",
                          "items"}
    assert batch["pixel_values"].shape == (16, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (16, 13) and batch["labels"].dtype == torch.float32
    assert batch["input_ids"].dtype == batch["answer_ids"].dtype == batch["image_ids"].dtype == torch.int64
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert torch.equal(batch["labels"].argmax(1), batch["answer_ids"]) and torch.all(batch["labels"].sum(1) == 1)
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())

    item = vqa_test_set.__getitems__([5])
    image = torch.from_numpy(data.test.images[data.test.image_index[5]]).permute(2, 0, 1)
    assert torch.allclose(item["pixel_values"][0], image.float() / 127.5 - 1)
    assert item["image_ids"].item() == data.test.image_index[5] and item["answer_ids"].item() == data.test.answer_ids[5]
    assert tokenizer.decode(item["input_ids"][0], skip_special_tokens=True) == data.test.questions[5]
    single = vqa_test_set[5]
    assert single["input_ids"].shape == (int(item["attention_mask"].sum()),) and single["labels"].shape == (13,)


def test_batches_are_trimmed_to_their_longest_sequence(vqa_test_set: VQADataset) -> None:
    lengths = vqa_test_set.text["attention_mask"].sum(1)
    padded = vqa_test_set.text["input_ids"].shape[1]
    shortest = torch.argsort(lengths)[:8].tolist()
    batch = vqa_test_set.__getitems__(shortest)
    assert batch["input_ids"].shape[1] == batch["attention_mask"].shape[1] == int(lengths[shortest].max()) < padded
    assert torch.equal(batch["attention_mask"].sum(1), lengths[shortest])  # nothing real was cut


def test_caption_batches_resized_to_32_with_word_ids(data: EasyVQA, captions, tokenizer) -> None:
    corpus = captions["test"]
    dataset = CaptionDataset(data.test.images, corpus.image_index, corpus.texts, tokenizer, 32, 32)
    batch = next(iter(DataLoader(dataset, batch_size=12, collate_fn=identity_collate)))
    assert set(batch) == {"input_ids", "attention_mask", "word_ids", "special_tokens_mask", "pixel_values", "image_ids"}
    assert batch["pixel_values"].shape == (12, 3, 32, 32)
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert dataset.images.dtype == torch.uint8 and dataset.images.shape == (1000, 3, 32, 32)
    assert torch.equal(batch["image_ids"], torch.arange(12) // 3)
    # Downscaling keeps an image's mean colour.
    full = torch.from_numpy(data.test.images[0]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(batch["pixel_values"][0].mean((1, 2)), full.mean((1, 2)), atol=0.02)

    special = batch["special_tokens_mask"].bool()
    assert torch.equal(batch["word_ids"] == -1, special)
    for row in range(12):
        words = batch["word_ids"][row][~special[row]]
        assert torch.equal(words, torch.arange(len(words)))
        text = tokenizer.decode(batch["input_ids"][row][~special[row]])
        assert text == corpus.texts[row]


def test_long_texts_are_truncated_to_max_text_len(data: EasyVQA, tokenizer) -> None:
    test = data.test
    dataset = VQADataset(
        test.images[:1], np.zeros(3, dtype=np.int64), test.questions[:3], test.answer_ids[:3], 13, tokenizer, 5, 64
    )
    batch = dataset.__getitems__([0, 1, 2])
    assert batch["input_ids"].shape == (3, 5) and torch.all(batch["input_ids"][:, -1] == tokenizer.sep_token_id)


def test_out_of_range_indices_are_rejected_at_construction(data: EasyVQA, tokenizer) -> None:
    test = data.test
    with pytest.raises(ValueError, match="image indices"):
        CaptionDataset(test.images[:2], np.array([0, 2]), ["a red circle.", "a teal circle."], tokenizer, 8, 64)
    with pytest.raises(ValueError, match="answer ids"):
        VQADataset(test.images[:1], np.array([0]), ["what shape is present?"], np.array([13]), 13, tokenizer, 8, 64)
