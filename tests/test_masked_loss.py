"""Masked loss: per-image masks weight the denoising error; the background counts `objective.mask_floor`."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.config import load_recipe
from trainers.data import ImageFolderDataset, collate
from trainers.diffusion import VPSchedule
from trainers.engine import Trainer
from trainers.errors import UserError
from trainers.losses import denoising_loss, latent_mask

SIDE = 64


@pytest.fixture(scope="module")
def masked_data(digits_data, tmp_path_factory):
    """The digits with a mask each whose right half is black (not the subject)."""
    out = tmp_path_factory.mktemp("masked")
    shutil.copytree(digits_data / "images", out / "images")
    (out / "masks").mkdir()
    mask = np.full((SIDE, SIDE), 255, np.uint8)
    mask[:, SIDE // 2:] = 0
    rows = []
    for line in (digits_data / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        name = "masks/" + row["file_name"].split("/")[-1]
        Image.fromarray(mask).save(out / name)
        rows.append(row | {"mask": name})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def recipe(tiny_sd15, data, out, *overrides):
    return load_recipe("recipes/demo/sd15_lora_tiny.yaml", [
        f"model.pretrained={tiny_sd15}", f"data.source={data}", f"output_dir={out}", "train.report_to=none",
        "data.num_workers=0", "validation.every_steps=0", "checkpoint.every_steps=0", f"data.resolution={SIDE}",
        "train.log_every=1", *overrides])


def test_latent_mask_averages_the_pixels_each_latent_covers_and_lifts_the_background_to_the_floor():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1.0
    mask[..., :, 4] = 0.5  # a column half inside: averaged with its zero neighbour in the same 2x2 cell
    weights = latent_mask(mask, (4, 4), floor=0.2)
    assert torch.allclose(weights[0, 0, :, :2], torch.ones(4, 2))
    assert torch.allclose(weights[0, 0, :, 2], torch.full((4,), 0.2 + 0.8 * 0.25))
    assert torch.allclose(weights[0, 0, :, 3], torch.full((4,), 0.2))


def test_the_masked_half_gives_no_gradient_and_changing_it_leaves_the_loss_alone():
    """A pointwise model, so each latent element's error depends on that element alone: whatever the right half of
    x0 holds, the loss is the same and its gradient there is zero; the left half still counts."""
    schedule = VPSchedule(betas=torch.linspace(1e-4, 0.02, 1000))
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    mask = torch.ones(2, 1, 64, 64)
    mask[..., 32:] = 0.0
    batch = {"seeds": [1, 2], "mask": mask}
    model = lambda z, t: 0.5 * z  # noqa: E731
    loss = denoising_loss(x0, batch, schedule, model)
    loss.backward()
    assert x0.grad[..., 4:].abs().max() == 0 and x0.grad[..., :4].abs().max() > 0
    changed = x0.detach().clone()
    changed[..., 4:] += 10.0
    assert denoising_loss(changed, batch, schedule, model) == loss.detach()
    changed[..., :4] += 1.0
    assert denoising_loss(changed, batch, schedule, model) != loss.detach()
    floor = denoising_loss(x0.detach(), batch, schedule, model, mask_floor=1.0)
    assert floor == denoising_loss(x0.detach(), {"seeds": [1, 2]}, schedule, model)  # floor 1: no mask at all


def test_the_mask_is_cropped_and_flipped_with_its_image(masked_data, tiny_sd15, tmp_path):
    r = recipe(tiny_sd15, masked_data, tmp_path, "data.random_flip=true", "data.center_crop=false")
    ds = ImageFolderDataset(r.data)
    flips = set()
    for seed in range(8):
        item = ds[(0, seed)]
        mask = item["mask"][0]
        assert item["mask"].shape == (1, SIDE, SIDE)
        flipped = bool(mask[:, -1].mean() > 0.5)  # the subject half moved to the right
        assert torch.all(mask[:, :SIDE // 2] == (0.0 if flipped else 1.0))
        flips.add(flipped)
    assert flips == {True, False}
    assert collate([ds[(0, 0)], ds[(1, 1)]])["mask"].shape == (2, 1, SIDE, SIDE)


def test_alpha_channels_become_masks_and_opaque_images_train_whole(tmp_path, tiny_sd15):
    (tmp_path / "images").mkdir()
    rgba = np.zeros((SIDE, SIDE, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, SIDE // 2:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "images" / "a.png")
    Image.new("RGB", (SIDE, SIDE), (9, 9, 9)).save(tmp_path / "images" / "b.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "images/a.png", "text": "a"}\n'
                                             '{"file_name": "images/b.png", "text": "b"}\n')
    ds = ImageFolderDataset(recipe(tiny_sd15, tmp_path, tmp_path / "run", "data.mask_from_alpha=true").data)
    masks = {ds[(i, 0)]["caption"]: ds[(i, 0)]["mask"][0] for i in range(2)}
    assert masks["a"][:, :SIDE // 2].min() == 1.0 and masks["a"][:, SIDE // 2:].max() == 0.0
    assert masks["b"].min() == 1.0


def test_a_mask_of_another_shape_or_unreadable_is_named(masked_data, tiny_sd15, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(masked_data, data)
    Image.new("L", (SIDE, SIDE // 2)).save(data / "masks" / "00000.png")
    (data / "masks" / "00001.png").write_bytes(b"not an image")
    ds = ImageFolderDataset(recipe(tiny_sd15, data, tmp_path / "run").data)
    with pytest.raises(UserError, match="mask .*00000.png is 64x32, its image 64x64"):
        ds[(0, 0)]
    with pytest.raises(UserError, match="cannot read mask .*00001.png"):
        ds[(1, 0)]


def test_training_with_masks_weights_the_loss_and_a_floor_of_one_is_no_mask(masked_data, digits_data, tiny_sd15,
                                                                            tmp_path):
    runs = {"plain": (digits_data,), "floor1": (masked_data, "objective.mask_floor=1.0"),
            "masked": (masked_data,)}
    losses = {}
    for name, (data, *overrides) in runs.items():
        Trainer(recipe(tiny_sd15, data, tmp_path / name, "train.max_steps=3", *overrides)).fit()
        lines = (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines]
    assert losses["floor1"] == pytest.approx(losses["plain"], rel=1e-6)
    assert all(m < p for m, p in zip(losses["masked"], losses["plain"]))  # half the elements weigh 0


@pytest.fixture(scope="module")
def prepared_masks(masked_data, tmp_path_factory):
    """masked_data through prepare, with one mask of another shape and one that is not an image (both skipped)."""
    from datasets_prep.__main__ import main as prep

    source = tmp_path_factory.mktemp("masked_source")
    shutil.copytree(masked_data, source, dirs_exist_ok=True)
    Image.new("L", (SIDE, SIDE // 2)).save(source / "masks" / "00000.png")
    (source / "masks" / "00001.png").write_bytes(b"not an image")
    out = tmp_path_factory.mktemp("masked_prepared")
    assert prep(["prepare", "--source", str(source), "--out", str(out), "--resolution", str(SIDE),
                 "--min-size", "8", "--shard-rows", "24", "--buckets", "square"]) == 0
    return out


def test_prepare_keeps_masks_with_their_images_and_names_the_bad_ones(prepared_masks):
    from datasets_prep.reader import PreparedDataset

    skipped = [json.loads(line) for line in (prepared_masks / "skipped.jsonl").read_text().splitlines()]
    reasons = {s["key"]: s["reason"] for s in skipped}
    assert reasons == {"images/00000.png": "mask_size_mismatch", "images/00001.png": "mask_not_an_image"}
    data = PreparedDataset(prepared_masks)
    assert data.has_masks and len(data) == 62
    mask = np.asarray(data.record(0)["mask"])
    assert mask.shape == (SIDE, SIDE) and mask[:, :SIDE // 2].min() == 255 and mask[:, SIDE // 2:].max() == 0


def test_the_cache_stores_masks_at_latent_size_and_training_from_it_matches_images(prepared_masks, tiny_sd15,
                                                                                   tmp_path):
    from datasets_prep.__main__ import main as prep
    from datasets_prep.cache import CacheReader, find_cache
    from datasets_prep.reader import PreparedDataset
    from trainers.config import ModelConfig

    assert prep(["cache", "--data", str(prepared_masks), "--model", str(tiny_sd15), "--dtype", "float32"]) == 0
    path = find_cache(prepared_masks, ModelConfig(pretrained=str(tiny_sd15)), SIDE)
    reader = CacheReader(path, PreparedDataset(prepared_masks).shard_rows())
    assert reader.meta["masks"] == 62
    cached = reader.get(0)["mask"]
    assert cached.shape == (1, 8, 8) and cached[:, :, :4].min() == 1.0 and cached[:, :, 4:].max() == 0.0
    args = ("train.max_steps=3", "objective.mask_floor=0.1")
    runs = {}
    for name, extra in (("cached", ()), ("images", ("data.use_cache=false",))):
        trainer = Trainer(recipe(tiny_sd15, prepared_masks, tmp_path / name, *args, *extra))
        assert (trainer.dataset.cache is not None) == (name == "cached")
        trainer.fit()
        runs[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert runs["cached"] == pytest.approx(runs["images"], rel=1e-4)  # the same masks, pooled once or each step


def test_prepare_takes_masks_from_alpha_only_when_asked(tmp_path):
    from datasets_prep.__main__ import main as prep
    from datasets_prep.reader import PreparedDataset

    (tmp_path / "src" / "images").mkdir(parents=True)
    rgba = np.full((SIDE, SIDE, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:, SIDE // 2:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "src" / "images" / "a.png")
    (tmp_path / "src" / "metadata.jsonl").write_text('{"file_name": "images/a.png", "text": "a"}\n')
    for name, flags in (("plain", []), ("alpha", ["--mask-from-alpha"])):
        assert prep(["prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / name), "--resolution",
                     str(SIDE), "--min-size", "8", "--buckets", "square", "--workers", "1", *flags]) == 0
    assert not PreparedDataset(tmp_path / "plain").has_masks
    mask = np.asarray(PreparedDataset(tmp_path / "alpha").record(0)["mask"])
    assert mask[:, :SIDE // 2].min() == 255 and mask[:, SIDE // 2:].max() == 0
