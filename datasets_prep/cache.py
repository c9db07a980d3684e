"""Latents and text embeddings computed once per model, beside a prepared dataset, so training skips the VAE
and (frozen) text encoders: `python -m datasets_prep cache --data DIR --model PATH_OR_ID`.

DIR/cache/<key>/ holds one safetensors file per data shard, row for row (`<row>.latent_mean`,
`<row>.latent_std`, `<row>.text.<name>`, and `<row>.mask` at latent size where the record has a mask), and
meta.json, written last. The VAE posterior's mean and std are
stored, not a sample, so each epoch still draws a fresh latent. The key hashes what produced the tensors: the
model's VAE and text-encoder configs and weight files (or hub id and revision), the options that change the text
tensors (model.t5, model.max_sequence_length) and the data's resolution.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict, defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainers.config import ModelConfig
from trainers.errors import UserError

ENCODERS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_OPTIONS = ("t5", "max_sequence_length")  # model options that change the text tensors (sd3, flux)
META = "meta.json"


def model_identity(model: ModelConfig) -> dict:
    """What the cached tensors depend on, without loading the model."""
    path = Path(model.pretrained).expanduser()
    if path.is_dir():
        parts = {}
        for name in ENCODERS:
            folder = path / name
            if folder.is_dir():
                parts[name] = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) if f.suffix != ".json"
                                     else (f.name, f.read_text()) for f in folder.iterdir() if f.is_file())
        return {"folder": str(path.resolve()), "components": parts}
    if path.is_file():
        return {"file": str(path.resolve()), "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
    return {"hub": model.pretrained, "revision": model.revision, "variant": model.variant}


def cache_dir(data_dir: Path, model: ModelConfig, resolution: int) -> Path:
    defaults = ModelConfig(pretrained=model.pretrained)
    options = {k: getattr(model, k) for k in TEXT_OPTIONS if getattr(model, k) != getattr(defaults, k)}
    identity = json.dumps({"model": model_identity(model), "resolution": resolution} | ({"options": options}
                          if options else {}), sort_keys=True)  # options only when set: older keys stay valid
    return Path(data_dir) / "cache" / hashlib.sha256(identity.encode()).hexdigest()[:16]


def find_cache(data_dir: Path, model: ModelConfig, resolution: int) -> Path | None:
    """The complete cache for this model and resolution, if one was written."""
    path = cache_dir(data_dir, model, resolution)
    return path if (path / META).is_file() else None


def write_cache(data_dir: Path, model: ModelConfig, batch_size: int = 16, dtype: str = "float16",
                device: str | None = None) -> Path:
    """Encode every record once; a re-run skips shards already written."""
    from datasets_prep.reader import PreparedDataset
    from trainers.backbones import load_backbone

    data = PreparedDataset(data_dir)
    resolution = json.loads((Path(data_dir) / "progress.json").read_text())["params"]["resolution"]
    out = cache_dir(data_dir, model, resolution)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = load_backbone(model)
    for module in [backbone.vae, *backbone.text_encoders.values()]:
        module.to(device).eval()
    first, bar = 0, tqdm(total=len(data), desc="caching", unit="img")
    for shard, rows in data.shard_rows():
        target = out / f"{shard.stem}.safetensors"
        if not target.is_file():
            tensors = encode_rows(backbone, data, range(first, first + rows), batch_size, device)
            save_atomically({k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}, target)
        first += rows
        bar.update(rows)
    bar.close()
    with torch.no_grad():
        text_keys = sorted(backbone.encode_text([""], device))
    meta = {"model": model.pretrained, "family": backbone.family, "resolution": resolution, "dtype": dtype,
            "records": len(data), "text_keys": text_keys, "identity": model_identity(model),
            "masks": data.masks}
    (out / META).write_text(json.dumps(meta, indent=2))
    return out


@torch.no_grad()
def encode_rows(backbone, data, indices: range, batch_size: int, device) -> dict[str, torch.Tensor]:
    """Tensors for one shard, keyed by row within it; images of one size are encoded together."""
    from trainers.images import area_downsample, mask_tensor, to_tensor

    records = {i: data.record(i) for i in indices}
    by_size = defaultdict(list)
    for i, rec in records.items():
        by_size[rec["image"].size].append(i)
    tensors = {}
    for group in by_size.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            pixels = torch.stack([to_tensor(records[i]["image"]) for i in chunk]).to(device)
            dist = backbone.encode_images(pixels)
            text = backbone.encode_text([records[i]["caption"] for i in chunk], device)
            for j, i in enumerate(chunk):
                row = i - indices.start
                tensors[f"{row}.latent_mean"], tensors[f"{row}.latent_std"] = dist.mean[j], dist.std[j]
                tensors |= {f"{row}.text.{k}": v[j] for k, v in text.items()}
                if records[i]["mask"] is not None:  # at latent size: what the loss weighs each latent by
                    mask = mask_tensor(records[i]["mask"])
                    tensors[f"{row}.mask"] = area_downsample(mask, tuple(dist.mean.shape[-2:]))
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)


class CacheReader:
    """Random access to cached tensors by global record index (shard files opened lazily, a few at a time)."""

    def __init__(self, path: Path, shard_rows: list[tuple[Path, int]], max_open: int = 16):
        self.path, self.max_open = Path(path), max_open
        self.meta = json.loads((self.path / META).read_text())
        self.starts, self.files, total = [], [], 0
        for shard, rows in shard_rows:
            self.starts.append(total)
            self.files.append(self.path / f"{Path(shard).stem}.safetensors")
            total += rows
        if total != self.meta["records"]:
            raise UserError(f"cache {self.path} holds {self.meta['records']} records, the data {total}; "
                            "re-run `python -m datasets_prep cache`")
        self._open: OrderedDict[int, object] = OrderedDict()

    def get(self, index: int) -> dict:
        from bisect import bisect_right

        s = bisect_right(self.starts, index) - 1
        (handle, keys), row = self._file(s), index - self.starts[s]
        item = {"latent_mean": handle.get_tensor(f"{row}.latent_mean").float(),
                "latent_std": handle.get_tensor(f"{row}.latent_std").float(),
                "text": {k: handle.get_tensor(f"{row}.text.{k}").float() for k in self.meta["text_keys"]}}
        if f"{row}.mask" in keys:
            item["mask"] = handle.get_tensor(f"{row}.mask").float()
        return item

    def _file(self, s: int):
        from safetensors import safe_open

        if s not in self._open:
            if len(self._open) >= self.max_open:
                self._open.popitem(last=False)
            handle = safe_open(str(self.files[s]), framework="pt")
            self._open[s] = (handle, set(handle.keys()))
        self._open.move_to_end(s)
        return self._open[s]

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _open=OrderedDict())  # DataLoader workers reopen their own handles
