"""Image data: scikit-learn's bundled digits (the embedded default), CIFAR-10's python batches; batches.

Images are held as float32 (N, C, H, W) arrays normalised per channel with the training split's mean and
standard deviation. As for tokens (:mod:`depthgrow.data`), batches are a pure function of (seed, step):
the training batch of step s, its augmentation included, is drawn by a generator derived from (seed, s),
so resuming needs only the step. Validation is the first ``eval_batches · batch_size`` held-out images in
order, identical for every run with the same data, batch size and ``eval_batches``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthgrow.errors import DepthgrowError
from depthgrow.seeding import derived_seed

_TRAIN_STREAM = 3  # depthgrow.data's token batches use 2
_SPLIT_SEED = 0  # the digits' held-out images are the same for every run, whatever its seed
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_VAL_FILE = "test_batch"
CIFAR_CLASSES = 10
CROP_PADDING = 4


@dataclass
class ImageData:
    train_x: np.ndarray  # (N, C, H, W) float32, normalised per channel with the training split's statistics
    train_y: np.ndarray  # (N,) int64 class indices
    val_x: np.ndarray
    val_y: np.ndarray
    num_classes: int  # the model's num_classes must be at least this
    source: str

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def size(self) -> int:
        """Side of the (square) images."""
        return self.train_x.shape[2]


def load_images(path: str | None, val_fraction: float) -> ImageData:
    """The digits for ``path=None`` (``val_fraction`` of them held out), else CIFAR-10's python batches in
    ``path`` or in its ``cifar-10-batches-py`` subfolder (``test_batch`` is the validation split, so
    ``val_fraction`` is not used)."""
    if path is None:
        return _digits(val_fraction)
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DepthgrowError(f"image data path {folder} does not exist")
    if (folder / CIFAR_FOLDER).is_dir():
        folder = folder / CIFAR_FOLDER
    if not (folder.is_dir() and any((folder / name).exists() for name in (*CIFAR_TRAIN_FILES, CIFAR_VAL_FILE))):
        raise DepthgrowError(
            f"image data path {folder} is not CIFAR-10: expected a folder with its python batches "
            f"({', '.join(CIFAR_TRAIN_FILES)} and {CIFAR_VAL_FILE}, as in {CIFAR_FOLDER}) or the folder holding it"
        )
    return _cifar10(folder)


def holdout_split(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation images of a data set of ``n``: a fixed permutation (the same
    for every run), its first ``round(n · val_fraction)`` held out; both sorted."""
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise DepthgrowError(
            f"data.val_fraction={val_fraction} of {n} images leaves an empty training or validation split"
        )
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _digits(val_fraction: float) -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DepthgrowError("the digits images need scikit-learn: pip install 'depthgrow[vision]'") from None
    digits = load_digits()
    images = (digits.images / 16.0)[:, None].astype(np.float32)  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    train, val = holdout_split(len(images), val_fraction)
    return _normalised(
        images[train],
        labels[train],
        images[val],
        labels[val],
        num_classes=10,
        source=f"scikit-learn's digits ({len(images)} 8x8 images)",
    )


def _cifar10(folder: Path) -> ImageData:
    missing = [name for name in (*CIFAR_TRAIN_FILES, CIFAR_VAL_FILE) if not (folder / name).is_file()]
    if missing:
        raise DepthgrowError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}")
    train = [_cifar_batch(folder / name) for name in CIFAR_TRAIN_FILES]
    val_x, val_y = _cifar_batch(folder / CIFAR_VAL_FILE)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return _normalised(
        train_x, train_y, val_x, val_y, num_classes=CIFAR_CLASSES, source=f"CIFAR-10 batches in {folder}"
    )


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a pickle can run any code it names, and a data folder
    is no reason to trust that."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # how CIFAR-10's numpy 1.x pickles name it
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array part")
        return super().find_class(module, name)


def _cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: a pickled dict with b"data" (N, 3072) uint8 - the red, green and blue 32x32
    planes of each image, row-major - and b"labels"; as float32 (N, 3, 32, 32) in [0, 1] and int64."""
    try:
        with file.open("rb") as handle:
            batch = _ArraysOnly(handle, encoding="bytes").load()  # written by Python 2: byte-string keys
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (
        OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, MemoryError
    ) as error:  # fmt: skip
        raise DepthgrowError(f"{file} is not a CIFAR-10 python batch: {error}") from None
    if len(labels) != len(data):
        raise DepthgrowError(f"{file} holds {len(data)} images but {len(labels)} labels")
    if len(labels) and not 0 <= labels.min() <= labels.max() < CIFAR_CLASSES:
        raise DepthgrowError(f"{file} has labels outside 0..{CIFAR_CLASSES - 1}: not CIFAR-10")
    return data.astype(np.float32) / 255.0, labels


def _normalised(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *, num_classes: int, source: str
) -> ImageData:
    """Both splits shifted and scaled per channel by the training split's mean and standard deviation."""
    mean = train_x.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = train_x.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    scale = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return ImageData(
        train_x=scale(train_x), train_y=train_y, val_x=scale(val_x), val_y=val_y, num_classes=num_classes, source=source
    )


class ImageBatches:
    """Training batches by step and the fixed validation batches, as (images float32 (B, C, H, W), labels
    int64 (B,)) tensors; the interface of :class:`depthgrow.data.Batches`, counted in images."""

    unit = "image"
    bpe_json = None  # no tokenizer to keep

    def __init__(
        self, data: ImageData, *, batch_size: int, eval_batches: int, seed: int, augment: bool = False
    ) -> None:
        if batch_size > len(data.train_x):
            raise DepthgrowError(
                f"data {data.source}: train.batch_size={batch_size} exceeds the {len(data.train_x)} training images"
            )
        self.data = data
        self.batch_size = batch_size
        self.units_per_step = batch_size
        self.seed = seed
        self.augment = augment
        self._n_val = min(eval_batches * batch_size, len(data.val_x))

    def describe(self) -> str:
        data = self.data
        return (
            f"{data.source}, {data.num_classes} classes of {data.channels}-channel {data.size}x{data.size} images, "
            f"{len(data.train_x):,} training and {len(data.val_x):,} validation images"
        )

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` distinct training images; with ``augment``, each randomly shifted by up to
        ``CROP_PADDING`` pixels (a crop of the zero-padded image: 0 is the channel mean after normalising)
        and flipped left-right with probability 1/2, as He et al. train on CIFAR-10."""
        rng = np.random.default_rng(derived_seed(self.seed, _TRAIN_STREAM, step))
        index = rng.choice(len(self.data.train_x), size=self.batch_size, replace=False)
        x = self.data.train_x[index]
        if self.augment:
            x = _shift_and_flip(x, rng)
        return torch.from_numpy(x), torch.from_numpy(self.data.train_y[index])

    def val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``min(eval_batches · batch_size, validation images)`` in order, ``batch_size`` at a time
        (the last batch may be smaller: weight batch losses by their size)."""
        # copies, so that nothing done to a batch can reach the data
        return [
            (
                torch.from_numpy(self.data.val_x[s : s + self.batch_size].copy()),
                torch.from_numpy(self.data.val_y[s : s + self.batch_size].copy()),
            )
            for s in range(0, self._n_val, self.batch_size)
        ]


def _shift_and_flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, _, h, w = x.shape
    p = CROP_PADDING
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    dy, dx = rng.integers(0, 2 * p + 1, size=(2, n))
    flip = rng.random(n) < 0.5
    out = np.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop[:, :, ::-1] if flip[i] else crop
    return out
