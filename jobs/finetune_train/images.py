"""Images for image-classification: where they come from (a folder with one sub-folder of
images per class, or a table of image paths or bytes and labels), the checks made before any
training, and the transforms from the model's own data config (timm's: resize, centre crop,
normalisation; random resized crop and horizontal flip to train)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune_api.spec import FineTuneJobSpec
from finetune_train.data import DataError, _column, iter_rows, label_id

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageTable:
    """One image source as rows of (image: a path or the image's bytes, class id); where to
    find each image (`where`) is kept for error messages."""

    def __init__(self, images: list[str | bytes], labels: list[int], where: list[str]):
        self.images, self.labels, self.where = images, np.array(labels, dtype=np.int64), where
        self.targets = np.ones(len(images), dtype=np.int32)  # one label per row

    def __len__(self) -> int:
        return len(self.images)

    def example(self, i: int) -> tuple[str | bytes, int]:
        return self.images[i], int(self.labels[i])


def image_table(path: str, split: str, spec: FineTuneJobSpec) -> ImageTable:
    """The rows of a folder of class folders, or of a jsonl/csv/parquet table."""
    if Path(path).is_dir():
        return _folder(Path(path), split, spec)
    base, d = Path(path).resolve().parent, spec.dataset
    images, labels, where = [], [], []
    for start, rows in iter_rows(path, d.format):
        for i, row in enumerate(rows, start):
            image = _column(row, d.image_column, i, split)
            if isinstance(image, dict) and isinstance(image.get("bytes"), bytes):  # Hugging Face datasets' Image in parquet
                image = image["bytes"]
            if isinstance(image, str):
                image = image if image.startswith("s3://") or Path(image).is_absolute() else str(base / image)
            elif not isinstance(image, bytes):
                raise DataError(f"dataset.{split} row {i}: imageColumn {d.image_column!r} must be an image path or the "
                                f"image's bytes (got {type(image).__name__})")
            images.append(image)
            labels.append(label_id(row, i, split, spec))
            where.append(f"dataset.{split} row {i}")
    return ImageTable(images, labels, where)


def _folder(root: Path, split: str, spec: FineTuneJobSpec) -> ImageTable:
    names = spec.model.labels or [str(i) for i in range(spec.model.num_classes)]
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [p.name for p in folders if p.name not in names]
    if unknown:
        raise DataError(f"dataset.{split}: {root} has folders {unknown} that are not in model.labels {names}; "
                        "rename them or add them to labels")
    images, labels, where = [], [], []
    for folder in folders:
        for file in sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            images.append(str(file))
            labels.append(names.index(folder.name))
            where.append(f"dataset.{split}: {file}")
    if not images:
        raise DataError(f"dataset.{split}: no images in {root} (expected one folder of images per class, e.g. {root}/{names[0]}/1.png)")
    return ImageTable(images, labels, where)


def open_image(image: str | bytes):
    from PIL import Image

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
        return img.convert("RGB")


def check_images(table: ImageTable) -> None:
    """Every image exists and decodes: DataError names the file or row."""
    from PIL import Image, UnidentifiedImageError

    for image, where in zip(table.images, table.where):
        try:
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
                img.verify()
        except FileNotFoundError:
            raise DataError(f"{where}: no such image file: {image}") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"{where}: not a readable image ({err})") from None


def data_config(model, spec: FineTuneJobSpec) -> dict:
    """The model's own preprocessing (input size, mean, std, interpolation, crop) at
    dataset.imageSize: timm's data config (modeling put it in the config), or the Hugging Face
    image processor's."""
    if hasattr(model, "timm_model"):
        return dict(model.config.pretrained_cfg)
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(model.name_or_path)
    size = spec.dataset.image_size or proc.size.get("height") or proc.size.get("shortest_edge") or 224
    return {"input_size": (3, size, size), "mean": tuple(proc.image_mean), "std": tuple(proc.image_std),
            "interpolation": "bicubic" if getattr(proc, "resample", 2) == 3 else "bilinear",
            "crop_pct": getattr(proc, "crop_pct", None) or 1.0}


@dataclass
class ImageCollator:
    """Units (row indices) → {pixel_values, labels, tokens}; `tokens` counts images."""

    table: ImageTable
    transform: object

    def __call__(self, units: list[np.ndarray]) -> dict[str, torch.Tensor]:
        rows = [self.table.example(int(i)) for unit in units for i in unit]
        pixels = torch.stack([self.transform(open_image(image)) for image, _ in rows])
        return {"pixel_values": pixels, "labels": torch.tensor([label for _, label in rows]), "tokens": torch.tensor(len(rows))}


def transforms(config: dict, training: bool, augment: bool):
    import timm.data

    return timm.data.create_transform(**config, is_training=training and augment)
