"""Fashion-MNIST as an image folder: OUT/<class>/<index>.png, grayscale 28x28, from the IDX files of
the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist).

    python examples/data/fashion_mnist.py [--source DIR] [--out DIR] [--train N] [--per-class]

Takes the first N images of the training files, balanced: N/10 per class (N per class with
--per-class), in file order; <index> is the image's position in the training file, zero-padded
so that names sort in file order. The same arguments give the same files, byte for byte; a
folder that already holds exactly those files is left alone."""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from pathlib import Path

import numpy as np

APT_PACKAGE = "dataset-fashion-mnist"
SOURCE = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parent / "fashion-mnist"
# Label i's name, folder-safe ("T-shirt/top" has a slash).
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
IDX_UINT8 = 0x08


class DataError(Exception):
    pass


def idx_file(source: Path, name: str) -> Path:
    """The IDX file `name`, gzipped (as the Debian package ships it) or not."""
    for path in (source / f"{name}.gz", source / name):
        if path.is_file():
            return path
    raise DataError(f"{source / name}.gz (or {name}) does not exist; install the Debian package {APT_PACKAGE} "
                    f"(apt-get install {APT_PACKAGE}) or pass --source DIR")


def read_idx(path: Path, count: int | None = None) -> np.ndarray:
    """An IDX array of unsigned bytes: magic (0, 0, type 0x08, number of dimensions), the
    dimensions as big-endian uint32, then the data. Only the first `count` items are read."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        magic = f.read(4)
        if len(magic) != 4 or magic[:2] != b"\0\0" or magic[2] != IDX_UINT8:
            raise DataError(f"{path}: not an IDX file of unsigned bytes (magic {magic.hex()})")
        dims = [int(d) for d in np.frombuffer(f.read(4 * magic[3]), dtype=">u4")]
        if count is not None:
            dims[0] = min(dims[0], count)
        size = int(np.prod(dims))
        data = f.read(size)
    if len(data) != size:
        raise DataError(f"{path}: truncated ({len(data)} of {size} bytes)")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def balanced_indices(labels: np.ndarray, per_class: int) -> dict[int, list[int]]:
    """The first `per_class` positions of each label, in file order."""
    chosen = {label: np.flatnonzero(labels == label)[:per_class].tolist() for label in range(len(CLASSES))}
    short = {CLASSES[label]: len(ix) for label, ix in chosen.items() if len(ix) < per_class}
    if short:
        raise DataError(f"the training files have fewer than {per_class} images of {short}")
    return chosen


def up_to_date(out: Path, per_class: int) -> bool:
    """OUT already holds per_class PNGs in each class folder and nothing else there."""
    if not out.is_dir() or sorted(p.name for p in out.iterdir()) != sorted(CLASSES):
        return False
    return all(len(list((out / name).glob("*.png"))) == per_class == len(list((out / name).iterdir())) for name in CLASSES)


def write_png(pixels: np.ndarray, path: Path) -> None:
    """A grayscale PNG, written whole or not at all (a rerun after an interruption finds no
    half-written file), with no metadata that could vary between runs."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG")  # 2-D uint8: mode "L"
    os.replace(tmp, path)


def build(source: Path, out: Path, per_class: int) -> int:
    """Writes the image folder; returns how many PNGs were written (0 when it was up to date)."""
    if up_to_date(out, per_class):
        return 0
    labels = read_idx(idx_file(source, "train-labels-idx1-ubyte"))
    chosen = balanced_indices(labels, per_class)
    last = max(ix[-1] for ix in chosen.values())
    images = read_idx(idx_file(source, "train-images-idx3-ubyte"), count=last + 1)  # only as far as needed
    if images.shape[1:] != (28, 28) or len(labels) < len(images):
        raise DataError(f"{source}: unexpected training files (images {images.shape}, labels {labels.shape})")
    width = len(str(len(labels) - 1))
    for label, indices in chosen.items():
        folder = out / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        names = {f"{i:0{width}d}.png": i for i in indices}
        for stale in folder.iterdir():  # from an earlier run with another N
            if stale.is_file() and stale.name not in names:
                stale.unlink()
        for name, i in names.items():
            write_png(images[i], folder / name)
    return per_class * len(CLASSES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"folder of the IDX files (default: {SOURCE}, from {APT_PACKAGE})")
    parser.add_argument("--out", type=Path, default=OUT, help="image folder to write (default: examples/data/fashion-mnist)")
    parser.add_argument("--train", type=int, default=3000, metavar="N", help="images to take, balanced over the 10 classes (default 3000)")
    parser.add_argument("--per-class", action="store_true", help="N is the number of images per class, not in total")
    args = parser.parse_args(argv)
    if args.train <= 0 or (not args.per_class and args.train % len(CLASSES)):
        parser.error(f"--train must be a positive multiple of {len(CLASSES)} (or any positive number with --per-class)")
    per_class = args.train if args.per_class else args.train // len(CLASSES)
    try:
        written = build(args.source, args.out, per_class)
    except DataError as e:
        print(f"fashion_mnist.py: {e}", file=sys.stderr)
        return 1
    total = per_class * len(CLASSES)
    print(f"{args.out}: {total} images ({per_class} per class)" + ("" if written else ", already there"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
