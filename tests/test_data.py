"""trainers/data.py: the step sampler's order, sharding and resume; per-sample augmentation."""
import numpy as np
import pytest
import torch
from PIL import Image

from trainers import seeding
from trainers.config import DataConfig
from trainers.data import StepSampler, square_crop
from trainers.engine import Trainer
from trainers.errors import UserError


def step_keys(sampler, steps):
    """The sorted (index, seed) keys each optimizer step consumes on this rank."""
    it = iter(sampler)
    return [sorted(k for _ in range(sampler.grad_accum) for k in next(it)) for _ in range(steps)]


def one_bucket(n):
    return [np.arange(n)]


def test_batch_layout_does_not_change_what_a_step_sees():
    one = step_keys(StepSampler(one_bucket(10), batch_size=4, grad_accum=1, seed=3), 6)
    accum = step_keys(StepSampler(one_bucket(10), batch_size=2, grad_accum=2, seed=3), 6)
    ranks = [step_keys(StepSampler(one_bucket(10), batch_size=2, grad_accum=1, seed=3, world_size=2, rank=r), 6)
             for r in (0, 1)]
    assert one == accum == [sorted(a + b) for a, b in zip(*ranks)]
    assert not set(map(tuple, ranks[0][0])) & set(map(tuple, ranks[1][0]))  # ranks see distinct samples


def test_each_epoch_is_a_permutation_and_epochs_differ():
    keys = [k for step in step_keys(StepSampler(one_bucket(8), batch_size=4, grad_accum=1, seed=0), 4) for k in step]
    first, second = [i for i, _ in keys[:8]], [i for i, _ in keys[8:]]
    assert sorted(first) == sorted(second) == list(range(8)) and first != second
    assert len({s for _, s in keys}) == 16  # every sample slot has its own seed


def test_resume_continues_the_same_stream():
    full = step_keys(StepSampler(one_bucket(7), batch_size=3, grad_accum=2, seed=1), 5)
    resumed = step_keys(StepSampler(one_bucket(7), batch_size=3, grad_accum=2, seed=1, start_step=3), 2)
    assert full[3:] == resumed


def test_batches_never_mix_buckets_and_small_buckets_are_counted():
    buckets = [np.arange(0, 9), np.arange(9, 14), np.arange(14, 16)]  # 9, 5 and 2 images
    sampler = StepSampler(buckets, batch_size=2, grad_accum=2, seed=0)  # global batch 4
    assert sampler.steps_per_epoch == 2 + 1 and sampler.unused() == 2
    which = {i: b for b, idx in enumerate(buckets) for i in idx}
    for step in step_keys(sampler, 9):
        assert len({which[i] for i, _ in step}) == 1


def test_no_bucket_big_enough_is_a_clear_error():
    with pytest.raises(UserError, match="train.batch_size"):
        StepSampler([np.arange(3)], batch_size=4, grad_accum=1, seed=0)


def test_random_crop_and_flip_are_seeded_per_sample():
    cfg = DataConfig(source="x", resolution=16, center_crop=False, random_flip=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    a, crop = square_crop(img, cfg, seeding.numpy_rng(5, seeding.AUGMENT))
    b, _ = square_crop(img, cfg, seeding.numpy_rng(5, seeding.AUGMENT))
    outs = {square_crop(img, cfg, seeding.numpy_rng(s, seeding.AUGMENT))[0].sum().item() for s in range(8)}
    assert crop[0] == 0 and 0 <= crop[1] <= 27 - 16  # 24x40 resized to 16x27: only horizontal room
    assert torch.equal(a, b) and a.shape == (3, 16, 16) and len(outs) > 1
    assert a.min() >= -1 and a.max() <= 1


def test_per_sample_noise_ignores_batch_grouping():
    together = seeding.randn([1, 2, 3, 4], seeding.NOISE, (4, 2, 2), "cpu")
    apart = torch.cat([seeding.randn([1, 2], seeding.NOISE, (4, 2, 2), "cpu"),
                       seeding.randn([3, 4], seeding.NOISE, (4, 2, 2), "cpu")])
    assert torch.equal(together, apart)
    assert not torch.equal(together[0], seeding.randn([1], seeding.TIMESTEP, (4, 2, 2), "cpu")[0])


def test_prepared_dataset_trains_in_buckets(recipe_for, digits_data, tmp_path):
    """`datasets_prep prepare` output is a data.source: batches come from one bucket at their stored size."""
    from datasets_prep.__main__ import main as prep
    from trainers.engine import Trainer

    out = tmp_path / "prepared"
    assert prep(["prepare", "--source", str(digits_data), "--out", str(out), "--resolution", "64",
                 "--min-size", "8", "--image-format", "png"]) in (0, None)
    trainer = Trainer(recipe_for(f"data.source={out}", "train.max_steps=2", "train.batch_size=4"))
    result = trainer.fit()
    assert result.step == 2 and result.final_dir.is_dir()
    item = trainer.dataset[(0, 1)]
    assert item["pixel_values"].shape == (3, 64, 64) and item["original_size"] == (64, 64)
    with pytest.raises(UserError, match="data.resolution"):
        Trainer(recipe_for(f"data.source={out}", "data.resolution=128")).fit()


def test_flip_mirrors_the_crop_left_edge():
    cfg = DataConfig(source="x", resolution=16, center_crop=False, random_flip=True)
    img = Image.fromarray(np.zeros((16, 40, 3), dtype=np.uint8))
    lefts = {square_crop(img, cfg, seeding.numpy_rng(s, seeding.AUGMENT))[1][1] for s in range(20)}
    assert all(0 <= left <= 40 - 16 for left in lefts)


def test_mixed_sources_repeat_and_weight(recipe_for, digits_data, tmp_path):
    """DreamBooth with prior preservation: instance images repeated, class images weighted by lambda."""
    from datasets_prep.digits import write_digits_dataset
    from trainers.config import load_recipe
    from trainers.engine import Trainer

    sevens = tmp_path / "sevens"
    assert write_digits_dataset(sevens, n=4, only=7, subject="sks digit") == 4
    assert all("sks digit" in line for line in (sevens / "metadata.jsonl").read_text().splitlines())
    recipe = load_recipe("recipes/demo/sd15_dreambooth_tiny.yaml", [
        f"model.pretrained={recipe_for().model.pretrained}", f"data.source={sevens}",
        f"data.extra_sources=[{{source: {digits_data}, loss_weight: 0.5}}]", "data.repeats=3",
        f"output_dir={tmp_path}/run", "train.max_steps=2", "train.report_to=none", "validation.every_steps=0"])
    trainer = Trainer(recipe)
    data = trainer.dataset
    assert len(data) == 4 + 64 and sorted(map(len, data.buckets())) == [12, 64]  # 4 sevens x 3 repeats
    assert data[(0, 1)]["loss_weight"] == 1.0 and data[(4, 1)]["loss_weight"] == 0.5
    assert trainer.fit().final_dir.is_dir()


def test_zero_loss_weight_silences_a_source(recipe_for, tmp_path):
    args = ("train.max_steps=2", "train.log_every=1", "data.loss_weight=0.0", "optimizer.weight_decay=0")
    trainer = Trainer(recipe_for(*args))
    before = {k: p.detach().clone() for k, p in trainer.params.items()}
    trainer.fit()
    assert all(torch.equal(before[k], p) for k, p in trainer.params.items())
