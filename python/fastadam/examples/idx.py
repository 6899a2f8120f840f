"""Reader for the IDX files MNIST ships in (plain or gzip-compressed), in NumPy only.

IDX layout: two zero bytes, a type code, the number of dimensions n, then n big-endian
uint32 sizes, then the data in C order, big-endian.
"""

import gzip
import os
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["parse_idx", "read_idx", "load_mnist", "MNIST_FILES"]

Array = npt.NDArray[Any]

_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def parse_idx(data: bytes, name: str = "<bytes>") -> Array:
    """Array held in the IDX bytes ``data``; ValueError naming ``name`` if they are malformed."""
    if len(data) < 4:
        raise ValueError(f"{name}: not an IDX file: {len(data)} bytes, shorter than the 4-byte magic")
    if data[0] != 0 or data[1] != 0 or data[2] not in _TYPES:
        raise ValueError(f"{name}: not an IDX file: bad magic number 0x{data[:4].hex()}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated IDX header: {len(data)} bytes, need {header} for {ndim} dimensions")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_TYPES[data[2]])
    expected = header + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes in"
        raise ValueError(f"{name}: {what} IDX file: {len(data)} bytes, shape {shape} of {dtype.name} needs {expected}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike[str]) -> Array:
    """Array stored in the IDX file at ``path``; gzip-compressed files are recognised by content."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data: {e}") from None
    return parse_idx(data, str(path))


def _find(directory: str | os.PathLike[str], base: str) -> str:
    # Some mirrors spell the files with a dot (train-images.idx3-ubyte); accept both, plain or .gz.
    dotted = base.replace("-idx", ".idx")
    for name in (base, base + ".gz", dotted, dotted + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise ValueError(f"{directory}: no {base} or {base}.gz found")


def load_mnist(directory: str | os.PathLike[str]) -> tuple[Array, Array, Array, Array]:
    """(train_images, train_labels, test_images, test_labels) from the four MNIST IDX files.

    Images come back as uint8 (N, H, W), labels as uint8 (N,), checked to agree in count.
    """
    arrays = {key: read_idx(_find(directory, base)) for key, base in MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise ValueError(f"{directory}: {split} images must be 3-D and labels 1-D, "
                             f"got shapes {images.shape} and {labels.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"{directory}: {split} labels must be digits 0-9, "
                             f"found {labels.min()}..{labels.max()}")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise ValueError(f"{directory}: train and test images differ in size")
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]
