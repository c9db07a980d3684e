"""datasets_prep/cache.py: latents and text computed once, and training from them equals training from images."""
import json

import pytest

from datasets_prep.__main__ import main as prep
from datasets_prep.cache import cache_dir, find_cache, model_identity
from trainers.config import ModelConfig
from trainers.engine import Trainer
from trainers.errors import UserError


@pytest.fixture(scope="module")
def prepared(digits_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    assert prep(["prepare", "--source", str(digits_data), "--out", str(out), "--resolution", "64",
                 "--min-size", "8", "--shard-rows", "24"]) == 0
    return out


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_training_from_the_cache_matches_training_from_images(prepared, tiny_sd15, recipe_for, tmp_path):
    model = ModelConfig(pretrained=str(tiny_sd15))
    assert find_cache(prepared, model, 64) is None
    assert prep(["cache", "--data", str(prepared), "--model", str(tiny_sd15), "--dtype", "float32",
                 "--batch-size", "5"]) == 0
    path = find_cache(prepared, model, 64)
    assert path is not None and len(list(path.glob("*.safetensors"))) == 3  # one per data shard (64 rows / 24)
    args = (f"data.source={prepared}", "train.max_steps=4", "train.log_every=1", "objective.caption_dropout=0.5",
            "train.batch_size=4")
    cached = Trainer(recipe_for(*args, out=tmp_path / "cached"))
    assert cached.dataset.cache is not None
    assert next(cached.backbone.vae.parameters()).device.type == "cpu"  # the VAE never needed the device
    cached.fit()
    images = Trainer(recipe_for(*args, "data.use_cache=false", out=tmp_path / "images"))
    assert images.dataset.cache is None
    images.fit()
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "images"), rel=1e-5, abs=1e-6)


def test_the_cache_key_follows_the_model(prepared, tiny_sd15, tiny_sdxl, tmp_path):
    a = cache_dir(prepared, ModelConfig(pretrained=str(tiny_sd15)), 64)
    assert a != cache_dir(prepared, ModelConfig(pretrained=str(tiny_sdxl)), 64)
    assert a != cache_dir(prepared, ModelConfig(pretrained=str(tiny_sd15)), 128)
    assert model_identity(ModelConfig(pretrained="owner/name", revision="v2"))["revision"] == "v2"


def test_flip_with_a_cache_is_refused(prepared, tiny_sd15, recipe_for):
    assert prep(["cache", "--data", str(prepared), "--model", str(tiny_sd15), "--dtype", "float32"]) == 0
    with pytest.raises(UserError, match="data.random_flip"):
        Trainer(recipe_for(f"data.source={prepared}", "data.random_flip=true"))


def test_sdxl_cache_holds_both_encoders_and_the_pooled_output(prepared, tiny_sdxl, recipe_for, tmp_path):
    from safetensors import safe_open

    assert prep(["cache", "--data", str(prepared), "--model", str(tiny_sdxl), "--dtype", "float32"]) == 0
    path = find_cache(prepared, ModelConfig(pretrained=str(tiny_sdxl)), 64)
    with safe_open(str(next(path.glob("*.safetensors"))), framework="pt") as f:
        assert f.get_tensor("0.text.hidden").shape == (77, 64)  # 32 + 32 from the two encoders
        assert f.get_tensor("0.text.pooled").shape == (32,)
    trainer = Trainer(recipe_for(f"model.pretrained={tiny_sdxl}", f"data.source={prepared}", "train.max_steps=2",
                                 "train.batch_size=4", "objective.caption_dropout=0.5"))
    assert trainer.dataset.cache is not None and trainer.fit().step == 2
