"""insightface verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...).

A ``.bin`` is a pickle of ``(images, issame)``: ``images`` a list of encoded
(JPEG/PNG) aligned 112x112 crops, ``issame`` one flag per pair, and pair
``k`` is images ``2k`` and ``2k+1``.  The files were written by Python 2,
hence ``encoding="bytes"``.  Unpickling is restricted to plain containers and
numpy arrays, so a hostile file cannot run code; and nothing it builds may
outgrow the file (``bytearray(n)``, an array of a given shape, or one image
referenced many times would turn 55 bytes into gigabytes).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ConfigError
from ..storage import open_url
from .sources import BadSample, decode

_EXPECTED = "expected a pickle of (list of encoded images, issame list) with two images per pair"
# What numpy needs to rebuild arrays (some sets hold each image's bytes as a uint8 array).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("__builtin__", "bytearray"),
}


class BinFormatError(ConfigError):
    """The file is not an insightface verification set; the message says what is wrong."""


def _of_bytes_only(make: Any) -> Any:
    """``bytearray`` of the file's bytes, never ``bytearray(n)``: n zero bytes from 5 bytes of file."""

    def bytearray_(*args: Any) -> bytearray:
        if args and not isinstance(args[0], (bytes, str)):
            raise pickle.UnpicklingError(f"bytearray of a {type(args[0]).__name__}, not of bytes")
        return make(*args)

    return bytearray_


def _empty_only(real: Any) -> Any:
    """numpy's ``_reconstruct``, which numpy's own pickles call with shape (0,) before filling the array
    from the file; any other shape would allocate it without the file holding the bytes."""

    def reconstruct(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
        if cls is not np.ndarray or tuple(shape) != (0,):
            raise pickle.UnpicklingError(f"an array of shape {shape!r} not read from the file")
        return real(cls, shape, dtype)

    return reconstruct


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        found = super().find_class(module, name)
        if name == "bytearray":
            return _of_bytes_only(found)
        return _empty_only(found) if name == "_reconstruct" else found


@dataclass
class BinSet:
    """A verification set: encoded images and one genuine flag per consecutive pair."""

    name: str
    url: str
    images: list[bytes]
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return len(self.issame)

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` decoded to uint8 112x112x3 RGB."""
        try:
            return decode(self.images[index], f"{self.url}#{index}")
        except BadSample as err:
            raise BinFormatError(f"{self.url}: image {index} does not decode ({err}); {_EXPECTED}") from None

    @property
    def first(self) -> np.ndarray:
        return np.arange(0, 2 * self.num_pairs, 2)

    @property
    def second(self) -> np.ndarray:
        return np.arange(1, 2 * self.num_pairs, 2)


def parse_bin(data: bytes, url: str) -> BinSet:
    """A ``BinSet`` from the bytes of a ``.bin``; ``BinFormatError`` naming the problem otherwise."""
    try:
        loaded = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # pickle raises many types for foreign bytes
        raise BinFormatError(f"{url}: not a pickle ({type(err).__name__}: {str(err)[:120]}); {_EXPECTED}") from None
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise BinFormatError(f"{url}: holds a {type(loaded).__name__}; {_EXPECTED}")
    images, issame = loaded
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple, np.ndarray)):
        raise BinFormatError(f"{url}: holds ({type(images).__name__}, {type(issame).__name__}); {_EXPECTED}")
    sizes = (len(x) if isinstance(x, (bytes, bytearray)) else getattr(x, "nbytes", 0) for x in images)
    if sum(sizes) > len(data):  # the same object referenced over and over
        raise BinFormatError(f"{url}: its images take more bytes than the {len(data)}-byte file holds; {_EXPECTED}")
    if not isinstance(issame, np.ndarray) and not all(isinstance(f, (bool, int, np.bool_, np.integer)) for f in issame):
        raise BinFormatError(f"{url}: issame must be a list of booleans; {_EXPECTED}")
    encoded = []
    for i, image in enumerate(images):
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 1:
            image = image.tobytes()
        if not isinstance(image, (bytes, bytearray)):
            raise BinFormatError(f"{url}: image {i} is a {type(image).__name__}, not encoded bytes; {_EXPECTED}")
        encoded.append(bytes(image))
    flags = np.asarray(issame)
    if flags.ndim != 1 or not (flags.dtype == bool or np.all(np.isin(flags, (0, 1)))):
        raise BinFormatError(f"{url}: issame must be a list of booleans; {_EXPECTED}")
    if len(encoded) != 2 * len(flags) or not len(flags):
        raise BinFormatError(f"{url}: {len(encoded)} images for {len(flags)} issame flags; {_EXPECTED}")
    name = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".bin")
    return BinSet(name=name, url=url, images=encoded, issame=flags.astype(bool))


def read_bin(url: str, storage_options: dict[str, Any] | None = None) -> BinSet:
    """Read a ``.bin`` from a local path or ``s3://`` URL; its first image must decode."""
    fs, path = open_url(url, storage_options, what=".bin set")
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ConfigError(f"{url}: no such file") from None
    except Exception as err:
        raise ConfigError(f"{url}: cannot read ({type(err).__name__}: {str(err)[:200]})") from None
    binset = parse_bin(data, url)
    binset.image(0)
    return binset
