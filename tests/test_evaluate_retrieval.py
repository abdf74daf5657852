"""Retrieval evaluation of models and stored runs: the model's unimodal embeddings and ITM
scores, the caption-split plumbing around engine.retrieval, and `ren eval retrieval`."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from engine.config import config_from_dict, load_preset
from engine.data.arrow import open_arrow
from engine.data.images import image_transform
from engine.data.tokenizer import build_word_tokenizer
from engine.data.transforms import HALF, NORMS, Normalization
from engine.errors import RenError
from engine.evaluate import RECALL_KEYS, RetrievalInputs, RunModel, caption_split, retrieval_scores
from engine.models import build_model
from engine.retrieval import evaluate_retrieval
from engine.runs import create_run
from engine.store import Store
from tests.helpers.cli import cli_streams, json_document, ren
from tests.helpers.paths import PRESETS

from .arrow_fixtures import WORDS, write_coco_caption, write_f30k_caption

VOCAB = 60
TINY = {"hidden_size": 32, "layers": 2, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0}
TWO_TOWER = {"kind": "two_tower", "text": {**TINY, "max_positions": 16},
             "vision": {**TINY, "patch_size": 8, "image_size": 32},
             "fusion": {"hidden_size": 32, "layers": 1, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0}}
DUAL = {"kind": "dual_encoder", "text": {**TINY, "max_positions": 16},
        "vision": {**TINY, "patch_size": 8, "image_size": 32}, "projection_dim": 16}
ONE_TOWER = {"kind": "one_tower", "backbone": {**TINY, "modality": "text", "patch_size": 8, "image_size": 32,
                                               "max_text_positions": 16}}
ALL = {"objectives": {"mlm": {}, "itm": {}, "itc": {}}}


def make(model: dict, stage: dict | None = None, vocab: int = VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config_from_dict({"model": model, **(stage or ALL)}), vocab_size=vocab).eval()


def inputs(b: int = 4, length: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 4:] = 0  # rows 0 and 2 are padded
    mask[2, 6:] = 0
    ids[mask == 0] = 0
    return ids, mask, torch.randn(b, 3, 32, 32, generator=g)


# ----------------------------------------------------------------------------
# VLModel: embeddings and ITM scores
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [TWO_TOWER, DUAL], ids=["two_tower", "dual_encoder"])
def test_embeddings_are_unit_norm_and_reproduce_the_itc_logits(arch: dict) -> None:
    stage = ALL if arch is TWO_TOWER else {"objectives": {"itc": {}}}
    model = make(arch, stage)
    ids, mask, pix = inputs()
    with torch.no_grad():
        texts, images = model.embed_texts(ids, mask), model.embed_images(pix)
        logits = model(ids, mask, pix, itc=True).logits["itc"]
    width = 16 if arch is DUAL else 32
    assert texts.shape == (4, width) and images.shape == (4, width)
    assert torch.allclose(texts.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(images.norm(dim=1), torch.ones(4), atol=1e-5)
    scale = model.heads["itc"].logit_scale.clamp(max=math.log(100.0)).exp()
    assert torch.allclose(scale * texts @ images.T, logits, atol=1e-4)
    # a text's embedding does not depend on the rows it is batched with
    assert torch.allclose(model.embed_texts(ids[2:3, :6], mask[2:3, :6]), texts[2:3], atol=1e-5)


def test_itm_scores_are_the_match_log_odds_of_forward() -> None:
    model = make(TWO_TOWER)
    ids, mask, pix = inputs()
    with torch.no_grad():
        logits = model(ids, mask, pix, itm_rows=slice(None)).logits["itm"]
        scores = model.itm_scores(ids, mask, pix)
    assert scores.shape == (4,)
    assert torch.allclose(scores, logits[:, 1] - logits[:, 0], atol=1e-5)
    assert torch.allclose(scores, torch.log_softmax(logits, 1)[:, 1] - torch.log_softmax(logits, 1)[:, 0],
                          atol=1e-5)
    # a different pairing gives other scores: the image matters
    assert not torch.allclose(model.itm_scores(ids, mask, pix.flip(0)), scores, atol=1e-4)


def test_fusion_of_cached_tower_outputs_matches_the_full_forward() -> None:
    model = make(TWO_TOWER)
    ids, mask, pix = inputs()
    with torch.no_grad():
        full = model.itm_scores(ids, mask, pix)
        text, image = model.text_tokens(ids, mask), model.image_tokens(pix)
        assert torch.allclose(model.fused_itm_scores(text, mask, image), full, atol=1e-5)
        # extra all-padding columns (as a cache padded to the longest caption holds) change nothing
        padded = torch.cat([text, torch.zeros(4, 5, text.shape[2])], dim=1)
        wider = torch.cat([mask, torch.zeros(4, 5, dtype=mask.dtype)], dim=1)
        assert torch.allclose(model.fused_itm_scores(padded, wider, image), full, atol=1e-5)
        # pairs are formed by indexing the cached rows
        order = torch.tensor([3, 0, 2, 1])
        assert torch.allclose(model.fused_itm_scores(text, mask, image[order]),
                              model.itm_scores(ids, mask, pix[order]), atol=1e-5)


def test_models_without_the_needed_heads_say_why() -> None:
    ids, mask, pix = inputs()
    with pytest.raises(RenError, match=r"one_tower model encodes text and image together"):
        make(ONE_TOWER, {"objectives": {"mlm": {}, "itm": {}}}).embed_texts(ids, mask)
    with pytest.raises(RenError, match=r"no ITC head.*\[objectives.itc\] to get a first stage"):
        make(TWO_TOWER, {"objectives": {"mlm": {}, "itm": {}}}).embed_images(pix)
    dual = make(DUAL, {"objectives": {"itc": {}}})
    with pytest.raises(RenError, match=r"no ITM head \(a dual_encoder has no fusion layers\)"):
        dual.itm_scores(ids, mask, pix)
    with pytest.raises(RenError, match=r"no ITM head \(its run did not train \[objectives.itm\]\)"):
        make(TWO_TOWER, {"objectives": {"itc": {}}}).itm_scores(ids, mask, pix)


# ----------------------------------------------------------------------------
# retrieval_scores on an arrow caption split
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f30k_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("f30k")
    write_f30k_caption(root, "test", n=6, rows_per_batch=4)
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


def test_caption_split_lists_every_caption_in_order(f30k_dir: Path) -> None:
    source = open_arrow([f30k_dir / "f30k_caption_karpathy_test.arrow"], "f30k_caption")
    texts, text_to_image = caption_split(source)
    assert texts == [c for i in range(6) for c in source.row(i, ["caption"])["caption"]]
    assert text_to_image == [i for i in range(6) for _ in range(5)]
    texts, text_to_image = caption_split(source, max_images=2)
    assert len(texts) == 10 and text_to_image == [0] * 5 + [1] * 5
    with pytest.raises(RenError, match="max_images must be a positive integer, got 0"):
        caption_split(source, max_images=0)


def test_retrieval_inputs_batches_and_cache_give_the_full_forward(f30k_dir: Path, tokenizer) -> None:
    """Texts and images embedded in batches, and ITM scores fused from the kept tower outputs,
    equal one full-batch forward of the model on the same captions and images. The weights are
    sharpened so that the ITM scores differ between pairs and a mixed-up pair would show (at
    their initial scale they differ by about 1e-3)."""
    source = open_arrow([f30k_dir / "f30k_caption_karpathy_test.arrow"], "f30k_caption")
    model = _sharpened(make(TWO_TOWER, vocab=len(tokenizer), seed=3))
    inputs = RetrievalInputs(model, tokenizer, source, image_size=32, norm=HALF, decode_workers=2)
    assert inputs.rerank and (inputs.n_texts, inputs.n_images) == (30, 6)
    with pytest.raises(RenError, match="embed every text and image first"):
        inputs.itm_score(torch.tensor([0]), torch.tensor([0]))
    enc = tokenizer(inputs.texts, padding="longest", truncation=True, max_length=40, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pix = HALF.apply(torch.stack([image_transform(32, train=False)(source.image(i)) for i in range(6)]))
    with torch.no_grad():
        texts = torch.cat([inputs.embed_texts(range(s, min(30, s + 4))) for s in range(0, 30, 4)])
        images = torch.cat([inputs.embed_images(range(s, min(6, s + 4))) for s in (0, 4)])
        assert torch.allclose(texts, model.embed_texts(ids, mask), atol=1e-5)
        assert torch.allclose(images, model.embed_images(pix), atol=1e-5)
        g = torch.Generator().manual_seed(0)
        text_idx, image_idx = torch.randint(0, 30, (40,), generator=g), torch.randint(0, 6, (40,), generator=g)
        got = inputs.itm_score(text_idx, image_idx)
        want = model.itm_scores(ids[text_idx], mask[text_idx], pix[image_idx])
    assert torch.allclose(got, want, atol=1e-5)
    assert float(want.std()) > 0.05  # the scores differ between pairs, so a mixed-up pair would show


@pytest.mark.parametrize("k", [2, 40])
def test_retrieval_scores_two_tower(f30k_dir: Path, tokenizer, k: int) -> None:
    source = open_arrow([f30k_dir / "f30k_caption_karpathy_test.arrow"], "f30k_caption")
    model = make(TWO_TOWER, vocab=len(tokenizer)).train()
    scores = retrieval_scores(model, tokenizer, source, image_size=32, norm=HALF, k=k, batch_size=4)
    assert model.training  # the mode is restored
    assert (scores["n_texts"], scores["n_images"], scores["k"]) == (30, 6, k)
    for key in RECALL_KEYS:
        assert 0.0 <= scores[key] <= 100.0
    assert scores["r_mean"] == pytest.approx(sum(scores[key] for key in RECALL_KEYS[:6]) / 6)
    # each text's k images are distinct pairs; the image side adds at most k texts each
    assert 30 * min(k, 6) <= scores["fused_pairs"] <= min(k * (30 + 6), 30 * 6)
    if k >= 30:
        assert scores["fused_pairs"] == 180  # every pair
    assert scores["ir_r10"] == 100.0  # 6 images: every text finds its own within 10
    for key in ("embed_s", "rerank_s", "total_s", "tokenize_s", "decode_s"):
        assert scores[key] >= 0.0


def test_retrieval_scores_match_a_direct_computation(f30k_dir: Path, tokenizer) -> None:
    """Batching, the tower-output cache and the image pipeline give what one full-batch
    forward per stage gives (2 images: their 10 captions are all different, so no ties)."""
    source = open_arrow([f30k_dir / "f30k_caption_karpathy_test.arrow"], "f30k_caption")
    model = make(TWO_TOWER, vocab=len(tokenizer), seed=3)
    got = retrieval_scores(model, tokenizer, source, image_size=32, norm=HALF, k=1, batch_size=3,
                           max_images=2)
    texts, text_to_image = caption_split(source, max_images=2)
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=40, return_tensors="pt")
    pix = HALF.apply(torch.stack([image_transform(32, train=False)(source.image(i)) for i in range(2)]))
    with torch.no_grad():
        t_emb = model.embed_texts(enc["input_ids"], enc["attention_mask"])
        i_emb = model.embed_images(pix)
        itm = model.itm_scores(enc["input_ids"].repeat_interleave(2, 0), enc["attention_mask"].repeat_interleave(2, 0),
                               pix.repeat(10, 1, 1, 1)).view(10, 2)
    assert len(set(texts)) == 10
    want = evaluate_retrieval(lambda span: t_emb[span.start:span.stop], lambda span: i_emb[span.start:span.stop],
                              lambda t, i: itm[t, i], text_to_image, 1, 64)
    assert want["fused_pairs"] == got["fused_pairs"]
    assert {key: got[key] for key in RECALL_KEYS} == pytest.approx({key: want[key] for key in RECALL_KEYS})
    # the first stage alone differs from the reranked result only through the ITM scores
    first = evaluate_retrieval(lambda span: t_emb[span.start:span.stop], lambda span: i_emb[span.start:span.stop],
                               None, text_to_image, 1, 64)
    dual_like = retrieval_scores(make(TWO_TOWER, {"objectives": {"itc": {}}}, vocab=len(tokenizer), seed=3),
                                 tokenizer, source, image_size=32, norm=HALF, k=1, batch_size=3, max_images=2)
    assert dual_like["fused_pairs"] == 0
    assert {key: dual_like[key] for key in RECALL_KEYS} == pytest.approx({key: first[key] for key in RECALL_KEYS})


def test_retrieval_scores_dual_encoder_ranks_by_the_first_stage(tmp_path: Path, tokenizer) -> None:
    write_coco_caption(tmp_path, "test", n=5, captions_per_image=3)
    source = open_arrow([tmp_path / "coco_caption_karpathy_test.arrow"], "coco_caption")
    scores = retrieval_scores(make(DUAL, {"objectives": {"itc": {}}}, vocab=len(tokenizer)), tokenizer, source,
                              image_size=32, norm=HALF, k=2, batch_size=2)
    assert (scores["n_texts"], scores["n_images"], scores["fused_pairs"]) == (15, 5, 0)
    assert all(0.0 <= scores[key] <= 100.0 for key in RECALL_KEYS)


def test_retrieval_scores_refuse_unreadable_images_and_one_tower(tmp_path: Path, tokenizer) -> None:
    path = write_f30k_caption(tmp_path, "test", n=3, corrupt=[1]).path
    source = open_arrow([path], "f30k_caption")
    with pytest.raises(RenError, match=r"f30k_caption_karpathy_test.arrow: the image of row 1 cannot be decoded"):
        retrieval_scores(make(TWO_TOWER, vocab=len(tokenizer)), tokenizer, source, image_size=32, norm=HALF)
    one = make(ONE_TOWER, {"objectives": {"mlm": {}, "itm": {}}}, vocab=len(tokenizer))
    with pytest.raises(RenError, match="one_tower"):
        retrieval_scores(one, tokenizer, source, image_size=32, norm=HALF, max_images=1)


# ----------------------------------------------------------------------------
# `ren eval retrieval`
# ----------------------------------------------------------------------------


ONE_TOWER_PRESET = (
    '[run]\nname = "one"\n[model]\nkind = "one_tower"\n[model.backbone]\nsource = "manual"\nmodality = "vision"\n'
    "hidden_size = 32\nlayers = 1\nheads = 2\npatch_size = 8\nimage_size = 32\n[objectives.mlm]\n[objectives.itm]\n"
)


def _preset(tmp_path: Path, name: str, body: str, data_cache: Path | None = None) -> Path:
    data = f'[data]\ncache_dir = "{data_cache}"\n' if data_cache else ""
    path = tmp_path / f"{name}.toml"
    path.write_text(f'extends = "{PRESETS / "base" / "easyvqa_two_tower.toml"}"\n{data}[run]\nname = "{name}"\n'
                    + body)
    return path


@pytest.mark.slow
def test_ren_eval_retrieval_end_to_end(tmp_path: Path, ren_home: Path, data_cache: Path, f30k_dir: Path) -> None:
    preset = _preset(tmp_path, "pre", "[objectives.mlm]\n[objectives.itm]\n[objectives.itc]\n"
                     "[train]\nmax_steps = 2\nbatch_size = 8\n", data_cache)
    trained = ren("run", str(preset), timeout=300)
    assert trained.returncode == 0, trained.stderr
    run_id = re.search(r"run (\S+) \(pretrain, two_tower\)", trained.stdout).group(1)

    result = ren("eval", "retrieval", run_id, "--root", str(f30k_dir), "--corpus", "f30k_caption", "--k", "4")
    assert result.returncode == 0, result.stderr
    ir = re.search(r"IR \(text -> image\)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", result.stdout)
    tr = re.search(r"TR \(image -> text\)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", result.stdout)
    assert ir and tr, result.stdout
    assert "6 images, 30 texts" in result.stdout and "top 4 reranked by ITM" in result.stdout
    scores = Store(ren_home).get_run(run_id).final_scores
    assert {f"f30k_caption/test/{key}" for key in RECALL_KEYS} <= set(scores)
    assert [round(scores[f"f30k_caption/test/ir_r{n}"], 2) for n in (1, 5, 10)] == [float(v) for v in ir.groups()]
    assert [round(scores[f"f30k_caption/test/tr_r{n}"], 2) for n in (1, 5, 10)] == [float(v) for v in tr.groups()]

    # a subset is stored under its own keys, next to the full split's
    subset = ren("eval", "retrieval", run_id[:18], "--root", str(f30k_dir), "--k", "2", "--max-images", "3")
    assert subset.returncode == 0, subset.stderr
    scores = Store(ren_home).get_run(run_id).final_scores
    assert {f"f30k_caption/test[:3]/{key}" for key in RECALL_KEYS} | {"f30k_caption/test/r_mean"} <= set(scores)
    assert "f30k_caption/test[:3]/ir_r1" in ren("show", run_id).stdout

    missing = ren("eval", "retrieval", run_id, "--root", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert "The arrow data directory" in missing.stderr and "does not exist" in missing.stderr
    no_split = ren("eval", "retrieval", run_id, "--root", str(f30k_dir), "--corpus", "coco_caption")
    assert no_split.returncode == 2 and "coco_caption_karpathy_test.arrow" in no_split.stderr
    bad = ren("eval", "retrieval", run_id, "--root", str(f30k_dir), "--corpus", "vqav2")
    assert bad.returncode == 2 and "not a retrieval benchmark" in bad.stderr

    # a one_tower run reranks the two_tower run's first stage with full forward passes
    one_tower = tmp_path / "one.toml"
    one_tower.write_text(f'{ONE_TOWER_PRESET}[data]\ncache_dir = "{data_cache}"\n'
                         "[train]\nmax_steps = 2\nbatch_size = 8\n")
    trained = ren("run", str(one_tower), timeout=300)
    assert trained.returncode == 0, trained.stderr
    one_id = re.search(r"run (\S+) \(pretrain, one_tower\)", trained.stdout).group(1)
    result = ren("eval", "retrieval", one_id, "--root", str(f30k_dir), "--first-stage", run_id, "--k", "3")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert f"first stage: run {run_id} (two_tower, ITC)" in out
    passes = re.search(r"top 3 reranked by ITM \((\d+) full forward passes, at most k x \(texts \+ images\) = 108\)",
                       out)
    assert passes and 30 * 3 <= int(passes.group(1)) <= 108, out
    ir = re.search(r"IR \(text -> image\) ([\d.]+) ([\d.]+) ([\d.]+)", out)
    scores = Store(ren_home).get_run(one_id).final_scores
    assert set(scores) == {f"f30k_caption/test@{run_id}/{key}" for key in RECALL_KEYS}
    stored = [round(scores[f"f30k_caption/test@{run_id}/ir_r{n}"], 2) for n in (1, 5, 10)]
    assert stored == [float(v) for v in ir.groups()]
    from engine.cli.evaluate import retrieval

    with pytest.raises(RenError, match=f"first-stage run {one_id} is a one_tower model"):
        retrieval(one_id, root=f30k_dir, corpus="f30k_caption", split="test", k=3, batch_size=8, max_images=None,
                  device="cpu", first_stage=one_id)


def test_ren_eval_retrieval_json_prints_the_recalls_it_stored(ren_home: Path, data_cache: Path, f30k_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`ren eval retrieval --json` through the real entry point on a tiny two-tower pretraining trained here:
    one document on stdout (schema ren.eval-retrieval/1) holding the recalls stored; the table on stderr."""
    from engine.train import train
    from tests.helpers.training import start, tiny_pretrain

    store = Store(ren_home)
    cfg, run_id = start(store, tiny_pretrain(data_cache))
    train(cfg, store, run_id)
    code, out, err = cli_streams(["eval", "retrieval", run_id, "--root", str(f30k_dir), "--k", "2", "--max-images",
                                  "4", "--device", "cpu", "--json"], monkeypatch, capsys)
    assert code == 0, err
    doc = json_document(out)
    assert doc["schema"] == "ren.eval-retrieval/1"
    assert (doc["run_id"], doc["first_stage"], doc["corpus"], doc["split"]) == (run_id, None, "f30k_caption", "test")
    assert (doc["n_images"], doc["n_texts"], doc["k"]) == (4, 20, 2) and doc["stored_as"] == "f30k_caption/test[:4]"
    stored = store.get_run(run_id).final_scores
    assert doc["recalls"] == {key: stored[f"f30k_caption/test[:4]/{key}"] for key in RECALL_KEYS}
    assert doc["recalls"]["ir_r10"] == 100.0  # 4 images: every text finds its own within 10
    assert doc["reranked"]["fused_pairs"] >= 20 * 2 and doc["reranked"]["full_passes"] == 0
    assert [Path(f).name for f in doc["files"]] == ["f30k_caption_karpathy_test.arrow"]
    assert "IR (text -> image)" in err and "stored in the run's final scores as f30k_caption/test[:4]/*" in err


def test_ren_eval_retrieval_errors(tmp_path: Path, ren_home: Path, f30k_dir: Path) -> None:
    from engine.cli.evaluate import retrieval

    store = Store(ren_home)
    untrained = create_run(store, load_preset(_preset(tmp_path, "untrained", "[objectives.itm]\n[objectives.itc]\n")),
                           None)
    result = ren("eval", "retrieval", untrained.id, "--root", str(f30k_dir))
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert f"run {untrained.id} has no final weights: it is created, not finished" in message
    assert f"ren run --resume {untrained.id}" in message

    def evaluate(run_id: str, first_stage: str | None = None) -> None:
        retrieval(run_id, root=f30k_dir, corpus="f30k_caption", split="test", k=4, batch_size=8, max_images=None,
                  device="cpu", first_stage=first_stage)

    one_tower = tmp_path / "one.toml"
    one_tower.write_text(ONE_TOWER_PRESET)
    one = create_run(store, load_preset(one_tower), None)
    with pytest.raises(RenError, match=f"run {one.id} is a one_tower model: it encodes text and image together.*"
                                       "give --first-stage RUN2"):
        evaluate(one.id)
    with pytest.raises(RenError, match=f"run {one.id} has no final weights"):  # a valid reranker, not trained
        evaluate(one.id, first_stage=untrained.id)
    finetuned = create_run(store, load_preset(_preset(tmp_path, "ft", "[task]\n")), None)
    with pytest.raises(RenError, match="finetuned on the vqa task, so its model has no ITC head"):
        evaluate(finetuned.id)
    with pytest.raises(RenError, match="finetuned on the vqa task, so its model has no ITM head to rerank"):
        evaluate(finetuned.id, first_stage=untrained.id)
    no_itc = create_run(store, load_preset(_preset(tmp_path, "noitc", "[objectives.itm]\n")), None)
    with pytest.raises(RenError, match=r"without \[objectives.itc\].*\[objectives.itc\] to get a first stage.*"
                                       "Or give --first-stage RUN2"):
        evaluate(no_itc.id)
    dual = create_run(store, config_from_dict({"run": {"name": "dual"}, "model": DUAL, "objectives": {"itc": {}}}),
                      None)
    with pytest.raises(RenError, match=f"run {dual.id} is a dual_encoder: it has no fusion layers"):
        evaluate(dual.id, first_stage=untrained.id)
    assert all(store.get_run(r.id).final_scores == {} for r in (untrained, one, finetuned, no_itc, dual))


# ----------------------------------------------------------------------------
# another run's first stage, reranked by a model without one
# ----------------------------------------------------------------------------

IMAGENET = Normalization(*NORMS["imagenet"], source="imagenet")
ONE_TOWER_48 = {"kind": "one_tower", "backbone": {**ONE_TOWER["backbone"], "image_size": 48}}
RERANK = {"objectives": {"mlm": {}, "itm": {}}}


def _sharpened(model):
    """``model`` with its weight matrices redrawn at std 0.3: a random tiny model at its initial scale
    gives nearly the same ITM score to every pair; this one's depend on both the text and the image."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3, generator=g)
    return model


def _candidate_pairs(sim: torch.Tensor, k: int) -> set[tuple[int, int]]:
    """Each text's top-k images and each image's top-k texts (stable order: ties to the lower index)."""
    by_text = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
    by_image = torch.sort(sim.T, dim=1, descending=True, stable=True).indices[:, :k]
    return ({(t, int(i)) for t, row in enumerate(by_text) for i in row}
            | {(int(t), i) for i, row in enumerate(by_image) for t in row})


@pytest.mark.parametrize("arch", [ONE_TOWER_48, TWO_TOWER], ids=["one_tower", "two_tower_without_itc"])
def test_a_model_without_a_first_stage_reranks_another_models(tmp_path: Path, tokenizer, arch: dict) -> None:
    """The dual encoder ranks with its own tokenizer, 32 px images and 0.5/0.5 normalisation; the
    reranker scores its candidates with its own tokenizer (other token ids), image size and ImageNet
    normalisation. The recalls equal a direct computation, and the ITM runs once per candidate pair.
    Every caption is distinct: a repeated caption ties with itself, and which of two tied texts ranks
    first then turns on last-bit differences between batchings (it did, with torch 2.14)."""
    write_f30k_caption(tmp_path, "test", n=6, rows_per_batch=4, distinct_captions=True)
    source = open_arrow([tmp_path / "f30k_caption_karpathy_test.arrow"], "f30k_caption")
    own_tokenizer = build_word_tokenizer(("0", "1", "2", *WORDS))  # every word 3 ids later
    size = 48 if arch is ONE_TOWER_48 else 32
    dual = make(DUAL, {"objectives": {"itc": {}}}, vocab=len(tokenizer), seed=1)
    reranker = _sharpened(make(arch, RERANK, vocab=len(own_tokenizer))).train()
    first = RunModel(dual, tokenizer, 32, HALF)
    k = 3
    got = retrieval_scores(reranker, own_tokenizer, source, image_size=size, norm=IMAGENET, k=k, batch_size=7,
                           first_stage=first)
    assert reranker.training and not dual.training  # the modes are restored

    texts, text_to_image = caption_split(source)
    def encode(tok, image_size, norm):
        enc = tok(texts, padding="longest", truncation=True, max_length=40, return_tensors="pt")
        pix = norm.apply(torch.stack([image_transform(image_size, train=False)(source.image(i)) for i in range(6)]))
        return enc["input_ids"], enc["attention_mask"], pix
    ids, mask, pix = encode(tokenizer, 32, HALF)
    own_ids, own_mask, own_pix = encode(own_tokenizer, size, IMAGENET)
    assert not torch.equal(ids, own_ids)
    with torch.no_grad():
        t_emb, i_emb = dual.embed_texts(ids, mask), dual.embed_images(pix)
        itm = reranker.eval().itm_scores(own_ids.repeat_interleave(6, 0), own_mask.repeat_interleave(6, 0),
                                         own_pix.repeat(30, 1, 1, 1)).view(30, 6)
    assert float(itm.std(0).mean()) > 0.05 and float(itm.std(1).mean()) > 0.05  # texts and images both matter
    want = evaluate_retrieval(lambda span: t_emb[span.start:span.stop], lambda span: i_emb[span.start:span.stop],
                              lambda t, i: itm[t, i], text_to_image, k, 64)
    assert {key: got[key] for key in RECALL_KEYS} == pytest.approx({key: want[key] for key in RECALL_KEYS})
    pairs = _candidate_pairs(t_emb @ i_emb.T, k)
    assert got["fused_pairs"] == len(pairs) <= k * (30 + 6) and len(pairs) < 30 * 6
    assert got["full_passes"] == (len(pairs) if arch is ONE_TOWER_48 else 0)  # a two_tower fuses kept towers


def test_a_reranker_needs_an_itm_head(f30k_dir: Path, tokenizer) -> None:
    source = open_arrow([f30k_dir / "f30k_caption_karpathy_test.arrow"], "f30k_caption")
    first = RunModel(make(DUAL, {"objectives": {"itc": {}}}, vocab=len(tokenizer)), tokenizer, 32, HALF)
    with pytest.raises(RenError, match="the reranking model has no ITM head"):
        retrieval_scores(make(ONE_TOWER, {"objectives": {"mlm": {}}}, vocab=len(tokenizer)), tokenizer, source,
                         image_size=32, norm=HALF, first_stage=first)
