"""ITM negatives and ITC positives: caption identity (false negatives), hard negatives, and
the batch gathered over processes (2 gloo processes against 1 with the same global batch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from engine import objectives as O
from engine.config import config_from_dict
from engine.errors import ConfigError
from engine.jobs.launchers import free_port
from tests.helpers.paths import REPO


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(image_ids: torch.Tensor) -> torch.Tensor:
    """One distinct constant image per image id (pixels identify the image)."""
    return image_ids.float()[:, None, None, None].expand(-1, 3, 2, 2).clone()


def _captions(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded with 0 to ``width``, and their attention mask."""
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
    return ids, mask


def test_text_keys_are_equal_exactly_for_equal_captions_whatever_the_padding():
    rows = [[1, 7, 8, 2], [1, 7, 8, 2], [1, 8, 7, 2], [1, 7, 8, 9, 2], [1, 7, 2]]
    keys = O.text_keys(*_captions(rows, 6))
    assert keys[0] == keys[1]
    assert len(set(keys[1:].tolist())) == 4
    # another process pads its batch to another length: the same caption keeps its key
    assert O.text_keys(*_captions(rows[:1], 4)) == keys[0]
    # a large vocabulary does not overflow into collisions
    g = _gen(0)
    many = torch.randint(0, 250_000, (20_000, 40), generator=g)
    assert O.text_keys(many, torch.ones_like(many)).unique().numel() == 20_000


def _duplicate_caption_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """12 pairs, 12 different images, 4 captions each used by 3 of them (easy-VQA's
    colour x shape captions repeat over images)."""
    image_ids = torch.arange(12)
    ids, mask = _captions([[1, 10 + r % 4, 2] for r in range(12)], 4)
    return image_ids, O.text_keys(ids, mask), _images(image_ids)


@pytest.mark.parametrize("hard", [False, True], ids=["random", "hard"])
def test_itm_never_pairs_a_text_with_an_image_whose_caption_equals_it(hard: bool):
    image_ids, keys, pix = _duplicate_caption_batch()
    # hard logits that would favour the false negatives if they were allowed
    hard_logits = 5.0 * (keys[:, None] == keys[None, :]).float() if hard else None
    caption_of_image = dict(zip(image_ids.tolist(), keys.tolist()))
    negatives = 0
    for seed in range(100):
        out, labels, unpaired = O.itm_pairs(pix, image_ids, keys, negative_ratio=0.5, generator=_gen(seed),
                                            hard_logits=hard_logits)
        shown = out[:, 0, 0, 0].long()
        for r in (labels == 0).nonzero().flatten().tolist():
            assert shown[r] != image_ids[r]
            assert caption_of_image[int(shown[r])] != keys[r], f"row {r}: negative image carries its caption"
        negatives += int((labels == 0).sum())
        assert unpaired == 0
    assert negatives > 400


def test_itc_counts_pairs_with_equal_captions_as_positives():
    image_ids, keys, _ = _duplicate_caption_batch()
    positives = O.describes(image_ids, keys, image_ids, keys)
    assert torch.equal(positives, keys[:, None] == keys[None, :])  # images differ: only captions pair them
    g = _gen(3)
    text, image = F.normalize(torch.randn(12, 8, generator=g), dim=-1), F.normalize(torch.randn(12, 8, generator=g),
                                                                                      dim=-1)
    logits = 10.0 * text @ image.T
    targets = positives.float() / 3  # each caption is shared by 3 pairs
    expected = 0.5 * (-(targets * F.log_softmax(logits, 1)).sum(1).mean()
                      - (targets * F.log_softmax(logits.T, 1)).sum(1).mean())
    loss = O.gathered_itc_loss(text, image, torch.tensor(10.0), image_ids, keys)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # by image id alone the other two pairs of each caption would be negatives: a different loss
    only_images = O.itc_loss(logits, image_ids[:, None] == image_ids[None, :])  # the old definition
    assert abs(only_images.item() - loss.item()) > 0.1


def test_a_text_describes_every_image_shown_with_its_caption_but_not_their_other_captions():
    """Pairs (image 0, caption X), (image 1, caption X), (image 1, caption Y): caption X
    describes images 0 and 1, caption Y only image 1. Each direction of ITC normalises its
    targets over its own row, so the relation need not be symmetric."""
    image_ids, keys = torch.tensor([0, 1, 1]), torch.tensor([5, 5, 6])
    positives = O.describes(image_ids, keys, image_ids, keys)
    assert positives.tolist() == [[True, True, True], [True, True, True], [False, True, True]]
    logits = torch.zeros(3, 3)  # uniform scores: the loss is the cross-entropy to the uniform guess
    loss = O.itc_loss(logits, positives)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-6)
    # ITM: the text of pair 2 may be paired with image 0 only; those of pairs 0 and 1 with none
    pixels, labels, unpaired = O.itm_pairs(_images(image_ids), image_ids, keys, negative_ratio=0.99,
                                           generator=_gen(0))
    assert labels.tolist() == [1, 1, 0] and pixels[2, 0, 0, 0] == 0 and unpaired == 2


def test_hard_negatives_follow_the_softmax_of_the_valid_similarities():
    image_ids = torch.tensor([0, 1, 2, 3, 4])
    keys = torch.tensor([10, 11, 12, 13, 10])  # pair 4 repeats pair 0's caption
    pix = _images(image_ids)
    logits = torch.tensor([[9.0, 0.0, 1.0, 2.0, 9.0]]).expand(5, -1).contiguous()
    counts = torch.zeros(5)
    draws = 3000
    for seed in range(draws):
        out, labels, _ = O.itm_pairs(pix, image_ids, keys, negative_ratio=0.99, generator=_gen(seed),
                                     hard_logits=logits)
        if labels[0] == 0:
            counts[int(out[0, 0, 0, 0])] += 1
    share = counts / counts.sum()
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)  # images 1, 2, 3: neither its own nor its caption's
    print(f"hard negatives of row 0: drawn shares {share[1:4].tolist()}, softmax {expected.tolist()}")
    assert share[0] == 0 and share[4] == 0
    assert torch.allclose(share[1:4], expected, atol=0.03)


def test_easy_vqa_caption_batches_lose_their_false_negatives(data_cache: Path):
    """On batches of easy-VQA captions, the share of ITM negatives whose image carries the text's own
    caption, and whose image shows the text's colour and shape in other words ("a circle that is red."
    for "a red circle."): pairing by image id alone (before issue 14), by caption tokens (the default
    for any caption data) and by the data's own meaning keys (what easy-VQA's captions carry)."""
    from engine.data.pipeline import build_data

    cfg = config_from_dict({
        "model": {"kind": "two_tower", "text": {"hidden_size": 32, "layers": 1, "heads": 2, "max_positions": 32},
                  "vision": {"hidden_size": 32, "layers": 1, "heads": 2, "patch_size": 16, "image_size": 32},
                  "fusion": {"layers": 1, "hidden_size": 32, "heads": 2}},
        "objectives": {"itm": {}}, "data": {"max_text_len": 16, "cache_dir": str(data_cache)}})
    data = build_data(cfg, cache_dir=data_cache)
    order = torch.randperm(len(data.train), generator=_gen(0))
    rates = {}
    for name in ("image id only", "caption tokens", "meaning keys"):
        same_caption = same_meaning = total = 0
        for i in range(40):
            batch = data.train.__getitems__(order[i * 64:(i + 1) * 64].tolist())
            tokens, meaning = O.text_keys(batch["input_ids"], batch["attention_mask"]), batch["text_keys"]
            pix = _images(batch["image_ids"])  # pixels that name the image, to see which one was drawn
            pairing = {"image id only": torch.arange(64), "caption tokens": tokens, "meaning keys": meaning}[name]
            out, labels, _ = O.itm_pairs(pix, batch["image_ids"], pairing, negative_ratio=0.5, generator=_gen(i))
            shown = out[:, 0, 0, 0].long()
            with_caption = set(zip(batch["image_ids"].tolist(), tokens.tolist()))
            meaning_of = dict(zip(batch["image_ids"].tolist(), meaning.tolist()))
            for r in (labels == 0).nonzero().flatten().tolist():
                total += 1
                same_caption += int((int(shown[r]), tokens[r].item()) in with_caption)
                same_meaning += int(meaning_of[int(shown[r])] == meaning[r].item())
        rates[name] = (same_caption / total, same_meaning / total)
        print(f"easy-VQA captions, batches of 64, pairing by {name}: of {total} ITM negatives, {same_caption} "
              f"({rates[name][0]:.2%}) show an image carrying the text's caption, {same_meaning} "
              f"({rates[name][1]:.2%}) one of the text's colour and shape")
    assert rates["image id only"][0] > 0.005 and rates["image id only"][1] > 0.03
    assert rates["caption tokens"][0] == 0 and rates["caption tokens"][1] > 0.02  # paraphrases stay
    assert rates["meaning keys"] == (0, 0)


# ----------------------------------------------------------------------------
# 2 gloo processes against 1 process with the same global batch
# ----------------------------------------------------------------------------

B = 8  # global batch
DIM = 6


def _global_inputs() -> dict[str, torch.Tensor]:
    """Features, image ids and captions of a global batch, with a repeated image and a caption
    repeated across the two halves (so positives cross processes)."""
    g = _gen(11)
    ids, mask = _captions([[1, 20 + r, 2] for r in range(B)], 4)
    ids[5] = ids[1]  # pair 5 (process 1) repeats the caption of pair 1 (process 0)
    return {"text_x": torch.randn(B, 10, generator=g), "image_x": torch.randn(B, 12, generator=g),
            "image_ids": torch.tensor([0, 1, 2, 0, 4, 5, 6, 7]), "keys": O.text_keys(ids, mask)}


def _itc_loss_and_grads(inputs: dict[str, torch.Tensor], rows: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """ITC of the rows ``rows`` (this process's share) through a tiny two-tower projection."""
    torch.manual_seed(0)  # the same weights in every process
    head = torch.nn.ModuleDict({"t": torch.nn.Linear(10, DIM), "v": torch.nn.Linear(12, DIM)})
    log_scale = torch.nn.Parameter(torch.tensor(2.0))
    text = F.normalize(head["t"](inputs["text_x"][rows]), dim=-1)
    image = F.normalize(head["v"](inputs["image_x"][rows]), dim=-1)
    loss = O.gathered_itc_loss(text, image, log_scale.exp(), inputs["image_ids"][rows], inputs["keys"][rows])
    loss.backward()
    return loss.detach(), [p.grad for p in [*head.parameters(), log_scale]]


def _step_itc(rows: slice) -> tuple[float, list[torch.Tensor]]:
    """The ITC loss and gradients of ``_pretrain_step`` on a tiny dual encoder (the same weights
    in every process, dropout off) for the rows ``rows`` of a fixed global batch."""
    from engine.models import build_model
    from engine.train import _pretrain_step

    cfg = config_from_dict({"model": {"kind": "dual_encoder", "projection_dim": 8,
                                      "text": {"hidden_size": 16, "layers": 1, "heads": 2, "max_positions": 8},
                                      "vision": {"hidden_size": 16, "layers": 1, "heads": 2, "patch_size": 8,
                                                 "image_size": 16}},
                            "objectives": {"itc": {}}, "train": {"batch_size": B}})
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=40).eval()
    g = _gen(5)
    ids, mask = _captions([[1, *torch.randint(5, 40, (4,), generator=g).tolist(), 2] for _ in range(B)], 8)
    ids[6] = ids[2]  # a caption repeated across the two processes
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(B, 3, 16, 16, generator=g),
             "image_ids": torch.tensor([0, 1, 2, 3, 0, 5, 6, 7])}
    loss, parts = _pretrain_step(model, {k: v[rows] for k, v in batch.items()}, cfg, None, _gen(0))
    loss.backward()
    return parts["loss_itc"].item(), [p.grad for p in model.parameters()]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = B // world
        rows = slice(rank * half, (rank + 1) * half)
        loss, grads = _itc_loss_and_grads(_global_inputs(), rows)
        step_loss, step_grads = _step_itc(rows)
        for grad in [*grads, *step_grads]:  # what DDP does with the gradients: the mean over processes
            dist.all_reduce(grad)
            grad /= world
        # ITM: process 0 shows one image only, so each of its negatives must come from process 1
        image_ids = torch.tensor([3, 3, 3, 3]) if rank == 0 else torch.tensor([4, 5, 6, 7])
        keys = torch.arange(4) + 4 * rank
        pixels, labels, unpaired = O.itm_pairs(_images(image_ids), image_ids, keys, negative_ratio=0.9,
                                               generator=_gen(rank))
        torch.save({"loss": loss, "grads": grads, "step_loss": step_loss, "step_grads": step_grads,
                    "shown": pixels[:, 0, 0, 0].long(), "labels": labels, "unpaired": unpaired},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_compute_the_itc_loss_and_gradients_of_one_with_the_same_global_batch(tmp_path: Path):
    single_loss, single_grads = _itc_loss_and_grads(_global_inputs(), slice(None))
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    print(f"ITC loss, global batch {B}: 1 process {single_loss.item():.6f}, "
          f"2 gloo processes {ranks[0]['loss'].item():.6f} / {ranks[1]['loss'].item():.6f}")
    for r in ranks:
        assert r["loss"].item() == pytest.approx(single_loss.item(), rel=1e-3)
        for got, want in zip(r["grads"], single_grads):
            assert torch.allclose(got, want, rtol=1e-3, atol=1e-6)
    # the same through the model and _pretrain_step
    step_loss, step_grads = _step_itc(slice(None))
    print(f"_pretrain_step ITC loss (dual encoder), global batch {B}: 1 process {step_loss:.6f}, "
          f"2 gloo processes {ranks[0]['step_loss']:.6f} / {ranks[1]['step_loss']:.6f}")
    for r in ranks:
        assert r["step_loss"] == pytest.approx(step_loss, rel=1e-3)
        for got, want in zip(r["step_grads"], step_grads):
            assert torch.allclose(got, want, rtol=1e-3, atol=1e-5)
    # ITM negatives come from the batch gathered over both processes
    zero = ranks[0]
    assert (zero["labels"] == 0).any() and zero["unpaired"] == 0
    assert set(zero["shown"][zero["labels"] == 0].tolist()) <= {4, 5, 6, 7}


# ----------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------

_TWO_TOWER = {"kind": "two_tower"}


def test_hard_negatives_need_the_itc_similarities():
    with pytest.raises(ConfigError, match=r"itm.negatives = \"hard\" draws each negative from the ITC"):
        config_from_dict({"model": _TWO_TOWER, "objectives": {"itm": {"negatives": "hard"}}})
    cfg = config_from_dict({"model": _TWO_TOWER, "objectives": {"itm": {"negatives": "hard"}, "itc": {}}})
    assert cfg.objectives.itm.negatives == "hard"
    assert config_from_dict({"model": _TWO_TOWER, "objectives": {"itm": {}}}).objectives.itm.negatives == "random"


@pytest.mark.parametrize("objective", ["itm", "itc"])
@pytest.mark.parametrize(("train", "key"), [({"micro_batch_size": 1}, "train.micro_batch_size = 1"),
                                             ({"batch_size": 1}, "train.batch_size = 1")])
def test_fewer_than_two_pairs_per_forward_is_refused(objective: str, train: dict, key: str):
    with pytest.raises(ConfigError, match=key):
        config_from_dict({"model": _TWO_TOWER, "objectives": {objective: {}}, "train": train})
    config_from_dict({"model": _TWO_TOWER, "objectives": {"mlm": {}}, "train": train})  # MLM needs no other pair


def test_ren_validate_refuses_a_micro_batch_of_one_for_itm():
    result = subprocess.run(
        [sys.executable, "-c", "from engine.cli import main; main()", "validate",
         str(REPO / "presets" / "easyvqa_pretrain.toml"), "--set", "train.micro_batch_size=1"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "micro_batch_size >= 2" in " ".join(result.stderr.split())
