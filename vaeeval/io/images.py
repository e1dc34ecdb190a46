"""A folder of PNG or JPEG images as data: one point per image, sorted by file name, read a block of images at a time.

Each image is 8-bit grayscale (one channel) or RGB (three), all of one size and
channel count, checked from the headers before any pixel is decoded. A point is
``[channels, height, width]`` and pixel value k is k/255 in float32, as torchvision's
``transforms.ToTensor`` gives it: the 256-level grid on [0, 1]. Files of other types
and hidden files in the folder are not read. Pillow is imported only when such a folder
is read (the ``images`` extra).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from vaeeval.errors import DataError, listing, option
from vaeeval.io.files import guarded
from vaeeval.io.h5ad import Rows

PILLOW_MISSING = "reading a folder of images needs the images extra: pip install 'vaeeval[images]'"
SUFFIXES = (".png", ".jpg", ".jpeg")
_CHANNELS = {"L": 1, "RGB": 3}
_LEVELS = np.float32(255)


def image_files(folder: Path) -> list[Path]:
    """The PNG and JPEG files of ``folder`` (not hidden, not in subfolders), sorted by name."""
    return sorted(
        (entry for entry in folder.iterdir() if entry.suffix.lower() in SUFFIXES and not entry.name.startswith(".") and entry.is_file()),
        key=lambda entry: entry.name,
    )


def is_image(magic: bytes) -> bool:
    """Whether a file's first bytes are a PNG's or a JPEG's."""
    return magic.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"))


class ImageRows(Rows):
    """The images of a folder as ``[N, channels, height, width]`` float32 points, k/255, decoded when asked for."""

    def __init__(self, folder: Path, files: list[Path], mode: str, size: tuple[int, int]) -> None:
        width, height = size
        super().__init__(folder, len(files), _CHANNELS[mode] * height * width, np.dtype(np.float32), None)
        self._point_shape = self._image_shape = (_CHANNELS[mode], height, width)  # reshape() changes only the first
        self._files, self._mode, self._size = files, mode, size

    @property
    def where(self) -> str:
        return "images"

    def _guarded(self) -> contextlib.AbstractContextManager[None]:
        return _guard(self.path)

    def _slice(self, start: int, stop: int) -> np.ndarray:
        return self._take(np.arange(start, stop))

    def _take(self, rows: np.ndarray) -> np.ndarray:
        block = np.empty((len(rows), *self._image_shape), dtype=np.float32)
        for at, row in enumerate(rows):
            block[at] = self._pixels(self._files[int(row)])
        return block

    def _pixels(self, path: Path) -> np.ndarray:
        from PIL import Image

        with _guard(path), Image.open(path) as image:
            _check_image(path, image, self._mode, self._size, self._files[0].name)
            return to_tensor(image)


def to_tensor(image: Any) -> np.ndarray:
    """An 8-bit image as ``[channels, height, width]``: k/255 in float32, as ``ToTensor`` divides."""
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1)
    return pixels.astype(np.float32) / _LEVELS


def decode(path: Path, data: bytes, label: str, first: tuple[str, tuple[int, int], str] | None, max_bytes: int | None = None,
           ) -> tuple[np.ndarray, tuple[str, tuple[int, int], str]]:
    """One encoded PNG or JPEG (a datasets ``Image`` column's bytes) as ``to_tensor`` gives it, checked as ``first``.

    Args:
        path: the file the bytes are in, for messages.
        label: where in it (``column 'image', row 5``).
        first: the first image's mode, size and label; None: this is the first.
        max_bytes: refuse an image declaring more bytes of float32 pixels (checked on the first).

    Returns:
        The pixels, and this image's ``(mode, size, label)`` (``first`` for the next).
    """
    import io

    _require_pillow(path)
    from PIL import Image

    with _guard(path), Image.open(io.BytesIO(data)) as image:
        mode, size, first_label = first if first is not None else (None, None, label)
        _check_image(path, image, mode, size, first_label, f"{label} ")
        if first is None and max_bytes is not None:
            _check_size(path, image, max_bytes, f"{label} ")
        return to_tensor(image), (image.mode, image.size, first_label)


def _require_pillow(path: Path) -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError(path, PILLOW_MISSING) from None


def read_images(folder: Path, max_bytes: int) -> ImageRows:
    """The images of ``folder``, every header checked: PNG or JPEG, 8-bit L or RGB, one size.

    Args:
        folder: the folder holding the images.
        max_bytes: refuse an image whose header declares more bytes of float32 pixels than this.

    Raises:
        DataError: Pillow missing; no images; an image that is not PNG or JPEG, not 8-bit
            grayscale or RGB, or whose size or channels differ from the first one's.
    """
    _require_pillow(folder)
    from PIL import Image

    files = image_files(folder)
    if not files:
        subfolders = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
        inside = f"; it has the folders {listing(subfolders, 4, counted=True)}: give one of them" if subfolders else ""
        raise DataError(folder, f"holds no PNG or JPEG images (nor a dataset saved by Hugging Face datasets){inside}")
    mode = size = None
    for path in files:
        with _guard(path), Image.open(path) as image:
            if mode is None:
                mode, size = image.mode, image.size
                _check_image(path, image, None, None, path.name)
                _check_size(path, image, max_bytes)
            else:
                _check_image(path, image, mode, size, files[0].name)
    return ImageRows(folder, files, mode, size)


def _check_image(path: Path, image: Any, mode: str | None, size: tuple[int, int] | None, first: str, label: str = "") -> None:
    """An image as the first one (``first`` names it): PNG or JPEG, 8-bit L or RGB, that mode and size."""
    if image.format not in ("PNG", "JPEG"):
        raise DataError(path, f"{label}is a {image.format} image; vaeeval reads PNG and JPEG")
    if image.mode not in _CHANNELS:
        raise DataError(path, f"{label}is {_describe_mode(image)}; vaeeval reads 8-bit grayscale (L) or RGB images, k/255: "
                        "convert it with Pillow (image.convert('L') or image.convert('RGB')), or save the values with numpy.save")
    if mode is not None and image.mode != mode:
        raise DataError(path, f"{label}is {image.mode} and {first} is {mode}; every image needs the same channels")
    if size is not None and image.size != size:
        raise DataError(path, f"{label}is {image.size[0]}x{image.size[1]} pixels and {first} is {size[0]}x{size[1]}; "
                        "every image needs the same size")


def _describe_mode(image: Any) -> str:
    if image.mode.startswith("I;16") or image.mode == "I":
        return f"a 16-bit image (mode {image.mode})"
    words = {"P": "a palette image", "RGBA": "an RGBA image (with alpha)", "LA": "a grayscale image with alpha",
             "1": "a 1-bit image", "CMYK": "a CMYK image", "F": "a 32-bit float image"}
    return f"{words.get(image.mode, 'an image')} (mode {image.mode})"


def _check_size(path: Path, image: Any, max_bytes: int, label: str = "") -> None:
    width, height = image.size
    needed = 4 * _CHANNELS[image.mode] * width * height
    if needed > max_bytes:
        raise DataError(path, f"{label}declares {width}x{height} pixels: {needed:,} bytes as float32, more than the {max_bytes:,} "
                        f"allowed ({option('max_data_size')})")


def _guard(path: Path) -> contextlib.AbstractContextManager[None]:
    """Whatever Pillow raises on a file's content (a truncated or corrupt image, a decompression bomb) is one line."""
    return guarded(path, "not an image Pillow can read")

