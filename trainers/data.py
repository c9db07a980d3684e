"""Training data: an image-caption dataset behind a small interface, and a resumable step sampler.

The sampler (StepSampler) maps an optimizer step to a global batch without state, so resuming at step s is
exact, and seeds each sample's randomness by its place in that batch (trainers.seeding), so the split into
micro-batches and ranks does not change what is drawn.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from datasets_prep.reader import decode_image
from trainers import seeding
from trainers.config import DataConfig, ModelConfig
from trainers.errors import UserError
from trainers.images import mask_tensor, to_tensor
from trainers.signals import SIGNALS

CONDITIONING_COLUMN = "conditioning_image"  # a ControlNet's input image, beside each training image


class CaptionedImages(Protocol):
    """What the training loader needs from a dataset; prepared shards and caches will plug in here."""

    def __len__(self) -> int: ...
    def __getitem__(self, key: tuple[int, int]) -> dict: ...  # key = (index, per-sample seed)
    def buckets(self) -> list[np.ndarray]: ...  # indices grouped by image size


class ImageFolderDataset:
    """An imagefolder with metadata.jsonl or metadata.csv (file_name, text), read with Hugging Face datasets."""

    def __init__(self, cfg: DataConfig, conditioning: bool = False):
        import datasets

        root = Path(cfg.source)
        if not root.is_dir():
            raise UserError(f"data.source: no such folder: {root}")
        if not any((root / f"metadata.{ext}").is_file() for ext in ("jsonl", "csv")):
            raise UserError(f"data.source: {root} has no metadata.jsonl or metadata.csv (file_name, text)")
        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
        except Exception as e:  # datasets raises many types for a malformed folder
            raise UserError(f"data.source: cannot read {root} as an imagefolder: {e}") from None
        if cfg.caption_column not in ds.column_names:
            raise UserError(f"data.caption_column: {cfg.caption_column!r} not in {root} metadata "
                            f"(columns: {', '.join(ds.column_names)})")
        if conditioning and CONDITIONING_COLUMN not in ds.column_names:
            raise UserError(f"data.source: {root} metadata has no {CONDITIONING_COLUMN!r} column, which a ControlNet "
                            "trains on; add one (a path per image), or derive edge maps with `python -m datasets_prep "
                            "prepare --conditioning canny`")
        if cfg.max_samples:
            ds = ds.select(range(min(cfg.max_samples, len(ds))))
        if len(ds) == 0:
            raise UserError(f"data.source: {root} holds no images")
        self.ds, self.cfg, self.root = ds.cast_column("image", datasets.Image(decode=False)), cfg, root
        self.conditioning = conditioning
        self.masks = cfg.mask_from_alpha or cfg.mask_column in ds.column_names

    def __len__(self) -> int:
        return len(self.ds)

    def buckets(self) -> list[np.ndarray]:
        return [np.arange(len(self.ds))]  # every image is cropped to one square size

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        row = self.ds[index]
        caption = row[self.cfg.caption_column] or ""
        image = self._decode(row["image"])
        plan = SquareCrop.draw(image.size, self.cfg, seeding.numpy_rng(seed, seeding.AUGMENT))
        pixels = to_tensor(plan(image))
        item = {"pixel_values": pixels, "caption": caption, "seed": seed, "target_size": tuple(pixels.shape[-2:]),
                "original_size": (image.height, image.width), "crop_top_left": plan.top_left}
        if self.conditioning:
            item["conditioning_pixel_values"] = to_unit_tensor(plan(self._conditioning_image(row, image.size)))
        if self.masks:
            item["mask"] = mask_tensor(plan(self._mask(row, image), mode="L"))
        return item

    def _mask(self, row: dict, image: Image.Image) -> Image.Image:
        """The row's mask, greyscale at its image's size: its alpha channel (data.mask_from_alpha), the file its
        mask column names, or, with neither, all of it (an image without a mask trains as a whole)."""
        if self.cfg.mask_from_alpha:
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                return image.convert("RGBA").getchannel("A")
            return Image.new("L", image.size, 255)
        name = row.get(self.cfg.mask_column)
        if not name:
            return Image.new("L", image.size, 255)
        return self._companion(self.root / name, image.size, "mask", "L")

    def _conditioning_image(self, row: dict, size: tuple[int, int]) -> Image.Image:
        """The row's conditioning image (a path relative to the folder) at its image's size, so the two are cropped
        alike; named when absent, unreadable or of another aspect ratio."""
        name = row.get(CONDITIONING_COLUMN)
        if not name:
            raise UserError(f"data.source: {row['image'].get('path') or self.root}: no {CONDITIONING_COLUMN} "
                            "in its metadata row")
        return self._companion(self.root / name, size, "conditioning image", "RGB")

    @staticmethod
    def _companion(path: Path, size: tuple[int, int], what: str, mode: str) -> Image.Image:
        """An image that is cropped like its training image (a conditioning image, a mask), at that image's size
        (resized in `mode` when it is not); one that is unreadable or of another aspect ratio is named."""
        try:
            image = Image.open(path)
            image.load()
        except Exception as e:
            raise UserError(f"data.source: cannot read {what} {path}: {e}") from None
        if image.size != size:
            if abs(image.size[0] * size[1] - image.size[1] * size[0]) > 0.01 * size[0] * size[1]:
                raise UserError(f"data.source: {what} {path} is {image.size[0]}x{image.size[1]}, its "
                                f"image {size[0]}x{size[1]}: another aspect ratio cannot be cropped alike")
            image = image.convert(mode).resize(size, Image.Resampling.BICUBIC)
        return image


    def _decode(self, image: dict) -> Image.Image:
        """Open one image, naming the file if it is not a readable image."""
        import io

        where = image.get("path") or f"record in {self.root}"
        try:
            img = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
            return ImageOps.exif_transpose(img)  # camera photos store rotation in EXIF
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise UserError(f"data.source: cannot read image {where}: {e}; "
                            "clean the data with `python -m datasets_prep prepare`") from None


def square_crop(image: Image.Image, cfg: DataConfig, rng: np.random.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize the short side to the resolution, crop a square, maybe flip.

    Returns (3, R, R) pixels in [-1, 1] and the crop's (top, left) in the resized image, as SDXL's
    micro-conditioning reads it (a flip mirrors the left edge).
    """
    plan = SquareCrop.draw(image.size, cfg, rng)
    return to_tensor(plan(image)), plan.top_left


@dataclasses.dataclass(frozen=True)
class SquareCrop:
    """One draw of resize, square crop and flip, so an image and its conditioning image are cut alike."""

    resized: tuple[int, int]   # (width, height) after the short side is scaled to the resolution
    left: int
    top: int
    side: int
    flip: bool

    @classmethod
    def draw(cls, size: tuple[int, int], cfg: DataConfig, rng: np.random.Generator) -> "SquareCrop":
        r, (w, h) = cfg.resolution, size
        scale = r / min(w, h)
        nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
        if cfg.center_crop:
            left, top = (nw - r) // 2, (nh - r) // 2
        else:
            left, top = int(rng.integers(0, nw - r + 1)), int(rng.integers(0, nh - r + 1))
        return cls((nw, nh), left, top, r, bool(cfg.random_flip and rng.random() < 0.5))

    def __call__(self, image: Image.Image, mode: str = "RGB") -> Image.Image:
        image = image.convert(mode).resize(self.resized, Image.Resampling.BICUBIC)
        image = image.crop((self.left, self.top, self.left + self.side, self.top + self.side))
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flip else image

    @property
    def top_left(self) -> tuple[int, int]:
        """(top, left) of the crop as SDXL's micro-conditioning reads it: a flip mirrors the left edge."""
        return self.top, (self.resized[0] - self.left - self.side) if self.flip else self.left


class PreparedImages:
    """Shards written by `python -m datasets_prep prepare`: clean, already resized to their buckets.

    With a matching `datasets_prep cache` for the model, items carry the VAE posterior and text tensors instead
    of pixels, and nothing is decoded.
    """

    def __init__(self, cfg: DataConfig, model: ModelConfig | None = None, conditioning: bool = False):
        from datasets_prep.cache import CacheReader, find_cache
        from datasets_prep.reader import PreparedDataset

        self.ds, self.cfg = PreparedDataset(cfg.source), cfg
        prepared = json.loads((Path(cfg.source) / "progress.json").read_text())["params"]["resolution"]
        if prepared != cfg.resolution:
            raise UserError(f"data.resolution is {cfg.resolution} but {cfg.source} was prepared at {prepared}; "
                            f"set data.resolution: {prepared} or prepare again")
        if len(self.ds) == 0:
            raise UserError(f"data.source: {cfg.source} holds no records (see its report.md)")
        found = find_cache(cfg.source, model, prepared) if model is not None and cfg.use_cache else None
        self.cache = CacheReader(found, self.ds.shard_rows()) if found else None
        if self.cache and cfg.random_flip:
            raise UserError(f"data.random_flip: the cache {found} holds unflipped latents; set data.random_flip: "
                            "false, or data.use_cache: false to flip images")
        if self.cache and self.ds.has_masks and "masks" not in self.cache.meta:
            raise UserError(f"data.source: {cfg.source} has masks but its cache {found} was written before masks "
                            "were cached; re-run `python -m datasets_prep cache` (or set data.use_cache: false)")
        self.conditioning = conditioning
        if conditioning:  # the first record before any training; every record as it is read
            self._conditioning_of(self.ds.record(0, decode=False))

    def __len__(self) -> int:
        return len(self.ds)

    def _conditioning_of(self, rec: dict) -> Image.Image:
        image = rec["conditioning_image"]
        if image is None:
            raise UserError(f"data.source: record {rec['key']!r} in {self.cfg.source} has no conditioning image, "
                            "which a ControlNet trains on; prepare again from a source with a conditioning_image "
                            "column, or with --conditioning canny")
        return decode_image(image) if isinstance(image, bytes) else image

    def buckets(self) -> list[np.ndarray]:
        column = self.ds.bucket_column
        return [np.flatnonzero(column == b) for b in np.unique(column)]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        rec = self.ds.record(index, decode=self.cache is None)
        control = {}
        if self.conditioning:  # never cached: the VAE does not see it
            control["conditioning_pixel_values"] = to_unit_tensor(self._conditioning_of(rec))
        if self.cache is not None:  # a cached mask is already at latent size, area-averaged
            return self.cache.get(index) | control | {
                "caption": rec["caption"], "seed": seed, "target_size": (rec["height"], rec["width"]),
                "original_size": (rec["original_height"], rec["original_width"]),
                "crop_top_left": (rec["crop_top"], rec["crop_left"])}
        image, left = rec["image"], rec["crop_left"]
        if rec["mask"] is not None:
            control["mask"] = mask_tensor(rec["mask"])
        if self.cfg.random_flip and seeding.numpy_rng(seed, seeding.AUGMENT).random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            control = {k: v.flip(-1) for k, v in control.items()}
            scale = max(rec["width"] / rec["original_width"], rec["height"] / rec["original_height"])
            left = max(rec["width"], round(rec["original_width"] * scale)) - left - rec["width"]
        return {"pixel_values": to_tensor(image), "caption": rec["caption"], "seed": seed,
                "target_size": (rec["height"], rec["width"]),
                "original_size": (rec["original_height"], rec["original_width"]),
                "crop_top_left": (rec["crop_top"], left)} | control


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [0, 1]: how diffusers' ControlNet pipelines feed a conditioning image."""
    return to_tensor(image).add(1.0).div(2.0)


class MixedSources:
    """Several sources as one index space; each keeps its buckets, repeats and loss weight."""

    def __init__(self, parts: list[CaptionedImages], repeats: list[int], loss_weights: list[float]):
        self.parts, self.repeats, self.loss_weights = parts, repeats, loss_weights
        self.offsets = np.cumsum([0, *map(len, parts)])[:-1]
        self.cache = getattr(parts[0], "cache", None)
        kinds = {type(p).__name__ + str(getattr(p, "cache", None) is not None) for p in parts}
        if len(kinds) > 1:  # a batch must stack: all pixels, or all cached latents
            raise UserError("data.extra_sources: mix only sources of one kind (all prepared and cached, "
                            "all prepared, or all imagefolders)")

    def __len__(self) -> int:
        return int(sum(map(len, self.parts)))

    def buckets(self) -> list[np.ndarray]:
        return [np.tile(b + off, reps) for part, off, reps in zip(self.parts, self.offsets, self.repeats)
                for b in part.buckets()]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        s = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[s][(index - int(self.offsets[s]), seed)] | {"loss_weight": self.loss_weights[s]}


def build_dataset(cfg: DataConfig, model: ModelConfig | None = None, conditioning: bool = False) -> CaptionedImages:
    """The recipe's data: one source, or several mixed with repeats and loss weights.

    conditioning: items also carry `conditioning_pixel_values` (ControlNet), and every source must have them.
    """
    sources = [(cfg.source, cfg.repeats, cfg.loss_weight),
               *((s.source, s.repeats, s.loss_weight) for s in cfg.extra_sources)]
    parts = [build_source(dataclasses.replace(cfg, source=src), model, conditioning) for src, _, _ in sources]
    if len(parts) == 1 and cfg.repeats == 1 and cfg.loss_weight == 1.0:
        return parts[0]
    return MixedSources(parts, [r for _, r, _ in sources], [w for _, _, w in sources])


def build_source(cfg: DataConfig, model: ModelConfig | None, conditioning: bool = False) -> CaptionedImages:
    """A prepared dataset (has progress.json; cached for `model` if a cache exists) or a raw imagefolder."""
    if (Path(cfg.source) / "progress.json").is_file():
        return PreparedImages(cfg, model, conditioning)
    return ImageFolderDataset(cfg, conditioning)


class StepSampler:
    """Yields this rank's micro-batches of (index, seed), from optimizer step `start_step` on, forever.

    An epoch shuffles each bucket, cuts it into global batches of G = batch_size * grad_accum * world_size
    (a batch never mixes buckets, so its images share one size), and shuffles the order of those batches.
    Optimizer step s takes global batch s of the endless sequence of epochs; micro-batch a of rank r takes
    slots [(a * world_size + r) * batch_size, ...) of it. A sample's seed is (seed, step, slot), so neither
    the split over ranks and micro-batches nor a resume changes what any sample sees.
    """

    def __init__(self, buckets: list[np.ndarray], batch_size: int, grad_accum: int, seed: int,
                 start_step: int = 0, world_size: int = 1, rank: int = 0):
        self.buckets = [np.asarray(b) for b in buckets]
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.start_step, self.world_size, self.rank = start_step, world_size, rank
        self.global_batch = batch_size * grad_accum * world_size
        self.steps_per_epoch = sum(len(b) // self.global_batch for b in self.buckets)
        if self.steps_per_epoch == 0:
            sizes = sorted((len(b) for b in self.buckets), reverse=True)
            raise UserError(f"train.batch_size: no bucket holds a global batch of {self.global_batch} images "
                            f"(batch_size x grad_accum x processes); the largest holds {sizes[0]}")
        self._epoch, self._plan = None, []

    def unused(self) -> int:
        """Images in buckets smaller than a global batch: never trained on."""
        return sum(len(b) for b in self.buckets if len(b) < self.global_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            batch = self.global_batch_at(step)
            for micro in range(self.grad_accum):
                first = (micro * self.world_size + self.rank) * self.batch_size
                yield [(int(batch[j]), seeding.mix(self.seed, step, j)) for j in range(first, first + self.batch_size)]
            step += 1

    def global_batch_at(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._plan, self._epoch = self._epoch_plan(epoch), epoch
        return self._plan[k]

    def _epoch_plan(self, epoch: int) -> list[np.ndarray]:
        rng = seeding.numpy_rng(seeding.mix(self.seed, epoch), seeding.AUGMENT)
        batches = []
        for bucket in self.buckets:
            shuffled = rng.permutation(bucket)
            n = len(bucket) // self.global_batch
            batches += [shuffled[i * self.global_batch:(i + 1) * self.global_batch] for i in range(n)]
        return [batches[i] for i in rng.permutation(len(batches))]


def collate(items: list[dict]) -> dict:
    """Stack tensors (a batch shares one bucket, so one size); keep per-sample records as lists."""
    batch = {"captions": [it["caption"] for it in items], "seeds": [it["seed"] for it in items]}
    for key in ("original_size", "crop_top_left", "target_size"):
        batch[key] = [it[key] for it in items]
    for key in ("pixel_values", "latent_mean", "latent_std", "conditioning_pixel_values"):  # (B, C, H, W)
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    if any("mask" in it for it in items):  # a mixed batch: an item from a source without masks is all subject
        like = next(it["mask"] for it in items if "mask" in it)
        batch["mask"] = torch.stack([it.get("mask", torch.ones_like(like)) for it in items])
    if "loss_weight" in items[0]:
        batch["loss_weight"] = torch.tensor([it["loss_weight"] for it in items])
    if "text" in items[0]:
        batch["text"] = {k: torch.stack([it["text"][k] for it in items]) for k in items[0]["text"]}
    return batch


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A stop signal sent to every process (`kill -- -PGID`, Slurm or systemd signalling a whole step) would
    otherwise kill the workers, and the trainer would die of its loader instead of checkpointing. So workers ignore
    SIGINT and SIGUSR1, and obey SIGTERM only from their parent: the loader's and multiprocessing's own shutdown
    terminate() workers that way (a worker deaf to it hangs the trainer's exit). Workers also end with the trainer
    (torch's watchdog)."""
    for s in SIGNALS:
        if s != signal.SIGTERM:
            signal.signal(s, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # no sender to tell apart (macOS): torch's own handling stays
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask

    def obey_the_parent_only() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=obey_the_parent_only, name="sigterm-from-parent", daemon=True).start()


def make_loader(dataset: CaptionedImages, sampler: StepSampler, num_workers: int) -> torch.utils.data.DataLoader:
    """An endless loader; its own generator keeps worker seeding off the global RNG."""
    workers = min(num_workers, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
        worker_init_fn=_leave_stop_signals_to_the_trainer,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        generator=torch.Generator().manual_seed(sampler.seed),
        prefetch_factor=4 if workers else None,
    )
