"""Pretraining caption corpora from ViLT-format arrow files, mixed, through `ren run`."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_preset
from engine.data.captions import ArrowCaptionDataset, open_corpus
from engine.data.images import image_transform
from engine.data.pipeline import build_data
from engine.data.tokenizer import build_word_tokenizer
from engine.data.transforms import HALF
from engine.errors import ConfigError
from engine.store import Store
from tests.helpers.cli import ren
from tests.helpers.paths import PRESETS

from .arrow_fixtures import WORDS, write_coco_caption, write_vg

BASE = PRESETS / "base" / "easyvqa_two_tower.toml"


@pytest.fixture
def corpora_dir(tmp_path: Path) -> Path:
    root = tmp_path / "arrows"
    root.mkdir()
    write_coco_caption(root, "train", n=3)
    write_coco_caption(root, "restval", n=2, start=3)
    write_coco_caption(root, "val", n=2, start=5)
    write_vg(root, n=4, start=10, corrupt=(11,))
    return root


def test_corpora_concatenate_caption_by_caption(corpora_dir: Path) -> None:
    coco, vg = open_corpus(corpora_dir, "coco_caption", "train"), open_corpus(corpora_dir, "vg", "train")
    assert [p.name for p in coco.paths] == ["coco_caption_karpathy_train.arrow", "coco_caption_karpathy_restval.arrow"]
    tokenizer = build_word_tokenizer(list(WORDS))
    data = ArrowCaptionDataset([coco, vg], tokenizer, 16, image_transform(32, train=False), HALF)
    vg_captions = sum(len(vg.row(i, ("caption",))["caption"]) for i in range(len(vg)))
    assert data.counts() == {"coco_caption": 5 * 5, "vg": vg_captions}
    batch = data.__getitems__(list(range(len(data))))
    kept = len(data) - len(vg.row(1, ("caption",))["caption"])  # VG's second image is unreadable
    assert batch["input_ids"].shape[0] == kept and data.skipped_images == 1
    assert batch["word_ids"].shape == batch["input_ids"].shape and batch["special_tokens_mask"].shape[0] == kept
    ids = batch["image_ids"].tolist()
    assert ids[:5] == [0] * 5 and len(set(ids)) == 5 + len(vg) - 1  # one id per image, across corpora
    first_caption = coco.row(0, ("caption",))["caption"][0]
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == first_caption


def test_config_and_pipeline(tmp_path: Path, corpora_dir: Path) -> None:
    overrides = ['data.dataset="captions"', f'data.root="{corpora_dir}"', 'data.corpora=["coco_caption", "vg"]',
                 'data.tokenizer="google/electra-small-discriminator"']
    cfg = load_preset(PRESETS / "easyvqa_pretrain.toml", overrides)
    data = build_data(cfg, cache_dir=tmp_path)
    assert len(data.train) == 25 + data.train.counts()["vg"] and len(data.eval) == 2 * 5  # eval: COCO Karpathy val
    with pytest.raises(ConfigError, match="give both or neither"):
        load_preset(PRESETS / "easyvqa_pretrain.toml", overrides[:2] + overrides[3:])
    with pytest.raises(ConfigError, match="none of the corpora vg has"):
        build_data(load_preset(PRESETS / "easyvqa_pretrain.toml", overrides[:2] + ['data.corpora=["vg"]'] +
                               overrides[3:]), cache_dir=tmp_path)


@pytest.mark.slow
def test_ren_run_pretrains_on_mixed_corpora(tmp_path: Path, corpora_dir: Path, ren_home: Path) -> None:
    preset = tmp_path / "pretrain.toml"
    preset.write_text(
        f'extends = "{BASE}"\n[objectives.mlm]\n[objectives.itm]\n[objectives.itc]\n'
        f'[data]\ndataset = "captions"\nroot = "{corpora_dir}"\ncorpora = ["coco_caption", "vg"]\n'
        'tokenizer = "google/electra-small-discriminator"\naugment = "randaugment"\n'
        "[train]\nmax_steps = 3\nbatch_size = 8\nlog_every = 1\ncpu_threads = 1\n"
    )
    result = ren("run", str(preset), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    store = Store(ren_home)
    (record,) = store.list_runs()
    assert record.status == "finished" and record.step == 3
    assert {"loss_mlm", "loss_itm", "loss_itc"} <= set(store.read_metrics(record.id)[-1])
