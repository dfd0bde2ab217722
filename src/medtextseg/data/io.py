"""Image and mask file I/O.

Every reader in the toolkit goes through these functions so that all images
arrive as ``[H, W, 3] uint8`` and all masks as ``[H, W] uint8`` with their raw
stored values, whatever the file format (PNG, JPEG, BMP, TIFF; gray, RGB,
RGBA, palette, 8- or 16-bit).
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from medtextseg.utils import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File suffixes (lower case) recognised as images or masks."""

_TIFF_SUFFIXES = (".tif", ".tiff")

# PIL modes that must go through PIL's own colour conversion before they mean RGB.
_PIL_CONVERT_TO_RGB = {"CMYK", "YCbCr", "LAB", "HSV"}


class ImageReadError(Exception):
    """An image or mask file could not be read or has an unusable layout.

    Attributes:
        path: the file.
        reason: what went wrong, in words (no path).
        fix: what to do about it, where the cause is known (an empty, truncated or
            non-image file); None when only a generic "re-export it" fits.
        kind: a short key for the cause: ``"missing"``, ``"not-a-file"``, ``"empty"``,
            ``"truncated"``, ``"not-an-image"``, ``"unreadable"`` (permission),
            ``"corrupt"`` (the decoder failed for another reason) or ``"layout"``
            (decoded, but the pixels do not fit: channels, dtype, colour mask).
    """

    def __init__(self, path: str | os.PathLike, reason: str, fix: str | None = None, kind: str = "layout"):
        self.path = Path(path)
        self.reason = reason
        self.fix = fix
        self.kind = kind
        super().__init__(f"cannot read {self.path}: {reason}" + (f"; {fix}" if fix else ""))

    def __reduce__(self):
        # Default exception pickling replays ``args`` (the formatted message), which does not
        # fit this constructor; DataLoader workers pickle exceptions.
        return (type(self), (self.path, self.reason, self.fix, self.kind))


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in _TIFF_SUFFIXES


_COPY_AGAIN = "copy it again from its source or re-export it"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# What a file that is not an image but sits among images usually is, by its first bytes.
_NOT_IMAGES = (
    (lambda head: head.startswith(b"version https://git-lfs"),
     "a Git LFS pointer, not the image itself",
     "fetch the real files with `git lfs pull`"),
    (lambda head: head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html", b"<?xml")),
     "an HTML or XML page, not an image: a failed download?",
     "download the file again"),
    (lambda head: head[128:132] == b"DICM",
     "a DICOM file, which medtextseg does not read",
     "convert it to PNG (e.g. with pydicom), keeping its name"),
    (lambda head: head[344:348] in (b"n+1\x00", b"ni1\x00") or head[:2] == b"\x1f\x8b",
     "a NIfTI volume or gzip file, not a 2-D image",
     "export the slices as PNG files, one image per slice"),
)


def _check_exists(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageReadError(path, "file does not exist", kind="missing") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot access the file ({exc.strerror or exc})", kind="unreadable") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageReadError(path, "not a file", kind="not-a-file")
    if info.st_size == 0:
        # A decoder would only say it "cannot identify" the file: say what is wrong.
        raise ImageReadError(path, "the file is empty (0 bytes)",
                             f"{_COPY_AGAIN}; an interrupted copy or export leaves empty files", kind="empty")


def _diagnose(path: Path, exc: BaseException) -> ImageReadError:
    """Turn a decoder's exception into what is actually wrong with the file.

    Decoders say "cannot identify image file" or "broken PNG file" for files that
    are cut short or are not images at all; the file's first and last bytes
    usually tell which, and are read only once decoding has failed.
    """
    if isinstance(exc, ImageReadError):
        return exc
    if isinstance(exc, PermissionError):
        return ImageReadError(path, "permission denied", "make the file readable (e.g. chmod a+r)",
                              kind="unreadable")
    try:
        data = path.read_bytes()
    except OSError as os_exc:
        return ImageReadError(path, f"{type(os_exc).__name__}: {os_exc.strerror or os_exc}", kind="unreadable")
    head = data[:1024]
    size = f"{len(data)} bytes"
    for test, what, fix in _NOT_IMAGES:
        if test(head):
            return ImageReadError(path, f"the file is {what}", fix, kind="not-an-image")
    # Without the path: a folder named "truncated" must not make every file truncated.
    said = str(exc).replace(str(path), "").replace(path.name, "").lower()
    if "truncated" in said or (
            head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR" and b"IEND" not in data) or (
            head.startswith(_JPEG_SIGNATURE) and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")):
        if head.startswith((_PNG_SIGNATURE, _JPEG_SIGNATURE)):
            fmt = "PNG" if head.startswith(_PNG_SIGNATURE) else "JPEG"
            where = f"the {fmt} ends before its end marker"
        else:
            fmt = "TIFF" if head.startswith(_TIFF_SIGNATURES) else "BMP" if head.startswith(b"BM") else "image"
            where = f"the {fmt}'s pixel data ends early"
        return ImageReadError(path, f"the file is truncated: {where}, after {size}",
                              f"{_COPY_AGAIN}; an interrupted copy or download cuts files short",
                              kind="truncated")
    known = head.startswith((_PNG_SIGNATURE, _JPEG_SIGNATURE, b"BM", *_TIFF_SIGNATURES))
    if not known and type(exc).__name__ == "UnidentifiedImageError":
        return ImageReadError(
            path, "not an image file: its first bytes are not those of a PNG, JPEG, BMP or TIFF",
            "re-export it as PNG, or remove it", kind="not-an-image")
    # PIL puts the full path in some messages; the path is shown beside the reason anyway.
    return ImageReadError(path, f"{type(exc).__name__}: {str(exc).replace(str(path), path.name)}",
                          kind="corrupt")


def _read_tiff_raw(path: Path) -> np.ndarray:
    """First page of a TIFF as stored: [H, W] or [H, W, C], any dtype."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise ValueError("TIFF has no pages")
        page = tif.pages[0]
        if int(page.photometric) == 3:
            # Palette TIFFs hold indices; PIL applies the colour map for us.
            raise ValueError("palette TIFF")
        array = page.asarray()
        axes = page.axes
    if array.ndim == 3 and axes.startswith("S"):
        # Planar-separate TIFFs store samples first: [C, H, W] -> [H, W, C].
        array = np.moveaxis(array, 0, -1)
    return array


def _read_pil_raw(path: Path, *, for_mask: bool) -> np.ndarray:
    """The first frame through PIL: [H, W] or [H, W, C], any dtype.

    For masks, palette images keep their indices (those are the class ids); for
    images they are expanded through the palette.
    """
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        if mode in ("P", "PA"):
            if for_mask:
                return np.asarray(img)
            img = img.convert("RGBA")
        elif mode in _PIL_CONVERT_TO_RGB:
            if for_mask:
                raise ImageReadError(path, f"mask stored in colour mode {mode}")
            img = img.convert("RGB")
        return np.asarray(img)


def _read_raw(path: str | os.PathLike, *, for_mask: bool) -> np.ndarray:
    path = Path(path)
    _check_exists(path)
    if _is_tiff(path):
        try:
            return _read_tiff_raw(path)
        except ImageReadError:
            raise
        except Exception as tiff_exc:  # noqa: BLE001 - tifffile failed (e.g. a codec it lacks): try PIL
            try:
                return _read_pil_raw(path, for_mask=for_mask)
            except ImageReadError:
                raise
            except Exception as pil_exc:
                found = _diagnose(path, pil_exc)
                if found.kind == "corrupt":
                    found = ImageReadError(path, f"tifffile: {tiff_exc}; PIL: {pil_exc}", kind="corrupt")
                raise found from pil_exc
    try:
        return _read_pil_raw(path, for_mask=for_mask)
    except ImageReadError:
        raise
    except Exception as exc:  # PIL raises many exception types for bad files
        raise _diagnose(path, exc) from exc


def _image_to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Map stored intensities to uint8.

    uint8 is kept; bool -> {0, 255}; 16-bit (and PIL's int32 storage of 16-bit
    PNGs) is scaled by 255/65535 over the full type range, not per image, so
    intensities stay comparable between images; floats in [0, 1] are scaled by
    255, other floats clipped to [0, 255].
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        wide = np.clip(array.astype(np.int64), 0, 65535)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            finite = finite * 255.0
        return np.clip(np.rint(finite), 0, 255).astype(np.uint8)
    raise ImageReadError(path, f"unsupported pixel type {array.dtype}")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB.

    Gray images are repeated to three channels, alpha is dropped, palette
    images are expanded, 16-bit images are scaled to 8 bits (see
    :func:`_image_to_uint8`). TIFF is read with tifffile (first page), falling
    back to PIL; other formats with PIL (first frame).

    Returns:
        ``[H, W, 3] uint8``, C-contiguous.

    Raises:
        ImageReadError: missing, empty, truncated, not an image, undecodable, or
            not 1/2/3/4 channels; its ``reason``, ``fix`` and ``kind`` say which.
    """
    path = Path(path)
    array = _image_to_uint8(_read_raw(path, for_mask=False), path)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ImageReadError(path, f"expected a 2-D image, got array of shape {array.shape}")
    channels = array.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        array = np.repeat(array[:, :, :1], 3, axis=2)
    elif channels in (3, 4):  # RGB, RGBA
        array = array[:, :, :3]
    else:
        raise ImageReadError(
            path, f"{channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)"
        )
    return np.ascontiguousarray(array)


def _mask_to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Keep stored mask values; only change the dtype where that loses nothing.

    bool -> {0, 1}; integer or integral float values in [0, 255] are cast; a
    16-bit binary mask stored as {0, 65535} becomes {0, 255}. Anything else
    (fractions, values > 255) raises rather than being silently rescaled.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ImageReadError(path, "mask holds NaN or infinite values")
        if np.any(array != np.rint(array)):
            raise ImageReadError(path, "mask holds fractional values (a probability map?)")
    elif not np.issubdtype(array.dtype, np.integer):
        raise ImageReadError(path, f"unsupported mask pixel type {array.dtype}")
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = array.min(), array.max()
    if low >= 0 and high <= 255:
        return array.astype(np.uint8)
    if low >= 0 and np.all((array == 0) | (array == 65535)):
        return (array > 0).astype(np.uint8) * 255
    raise ImageReadError(path, f"mask values span {low}..{high}, beyond 8 bits")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask with its raw values (no thresholding, no palette expansion).

    Gray + alpha keeps the gray channel; RGB(A) masks are accepted only when
    the colour channels are identical (a gray mask saved as RGB).

    Returns:
        ``[H, W] uint8``: e.g. {0, 255} or {0, 1} for binary masks, class ids
        for multi-class masks.

    Raises:
        ImageReadError: missing, empty, truncated, not an image, undecodable, a
            true colour mask, or values that do not fit uint8 without rescaling.
    """
    path = Path(path)
    array = _read_raw(path, for_mask=True)
    if array.ndim == 3:
        channels = array.shape[2]
        if channels in (1, 2):
            array = array[:, :, 0]
        elif channels in (3, 4):
            rgb = array[:, :, :3]
            if not (np.array_equal(rgb[:, :, 0], rgb[:, :, 1])
                    and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])):
                raise ImageReadError(
                    path, "mask is a colour image (R, G, B differ); expected one channel of "
                    "class ids"
                )
            array = rgb[:, :, 0]
        else:
            raise ImageReadError(path, f"mask has {channels} channels; expected 1")
    if array.ndim != 2:
        raise ImageReadError(path, f"expected a 2-D mask, got array of shape {array.shape}")
    return np.ascontiguousarray(_mask_to_uint8(array, path))


def _pil_size(path: Path, verify: bool) -> tuple[int, int]:
    with Image.open(path) as img:
        width, height = img.size
        if verify:
            if img.format == "PNG":
                # Checks every chunk's CRC up to IEND: catches truncation and bit rot
                # without inflating the pixel data.
                img.verify()
            else:
                if img.format == "JPEG":
                    # Decoding at 1/8 scale still walks the whole entropy-coded stream.
                    img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()
    return height, width


def _tiff_size(path: Path, verify: bool) -> tuple[int, int] | None:
    """``(H, W)`` via tifffile, or None where tifffile cannot (PIL then tries and reports)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            size = (int(page.imagelength), int(page.imagewidth))
            if verify:
                page.asarray()
    except Exception:  # noqa: BLE001 - any tifffile failure: PIL gets its turn
        return None
    return size


def image_size(path: str | os.PathLike, *, verify: bool = False) -> tuple[int, int]:
    """Size of an image or mask file from its header, without decoding pixels.

    Args:
        path: the file.
        verify: also check that the whole file is intact. PNG: chunk CRCs up to
            IEND (no inflate); JPEG: a 1/8-scale decode; TIFF and others: a full
            decode of the first page. Still much cheaper than :func:`read_image`
            for PNG and JPEG.

    Returns:
        ``(H, W)``.

    Raises:
        ImageReadError: missing, empty, not an image, or an unreadable header
            (or, with ``verify``, body: a truncated file is named as such).
    """
    path = Path(path)
    _check_exists(path)
    if _is_tiff(path):
        size = _tiff_size(path, verify)
        if size is not None:
            return size
    try:
        return _pil_size(path, verify)
    except Exception as exc:  # PIL raises many exception types for bad files
        raise _diagnose(path, exc) from exc


def write_png_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write an array as PNG so that readers never see a half-written file.

    The PNG goes to a temporary file in the same folder, is flushed to disk,
    then renamed over ``path`` (``os.replace`` is atomic within a file system).
    Missing parent folders are created.

    Args:
        path: destination (the format is PNG whatever the suffix).
        array: ``[H, W]`` uint8 / uint16 / bool (bool is stored as {0, 255}),
            or ``[H, W, 3]`` / ``[H, W, 4]`` uint8.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2 and array.dtype == np.uint16:
        img = Image.fromarray(array)
        if img.mode != "I;16":
            img = img.convert("I;16")
    elif array.dtype == np.uint8 and (
        array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    ):
        img = Image.fromarray(np.ascontiguousarray(array))
    else:
        raise ValueError(
            f"write_png_atomic: unsupported array {array.dtype} {array.shape}; expected "
            "[H, W] uint8/uint16/bool or [H, W, 3|4] uint8"
        )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
