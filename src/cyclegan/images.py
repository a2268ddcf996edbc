"""Decode, validate and convert one image file into the RGB pixels `prepare` stores.

Every way an input can be unusable ends in `BadImage` with a short reason (empty file, not an
image, truncated, decompression bomb, too small, unsupported mode); `prepare` then skips or stops
according to data.on_bad_image. Everything here is plain Pillow + NumPy (no torch) so that worker
processes start fast.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The extensions the official ImageFolder accepts, plus TIFF and WebP. Matched case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")

# Images with more pixels than this are refused before decoding (a small file can declare a huge
# canvas). Pillow's own limit by default; a module constant so tests can lower it.
MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485

RESAMPLE = Image.BICUBIC  # what the official transforms.Resize(..., BICUBIC) does on PIL images


class BadImage(Exception):
    """An unusable image file; str(e) is the reason, without the file name."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def list_files(folder: Path) -> list[str]:
    """All regular files under `folder`, as sorted relative POSIX paths; hidden entries skipped.

    Sorted like the official make_dataset so array order does not depend on the file system.
    Hidden files (.DS_Store, ._foo.jpg from macOS archives) are never data.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder)
        for f in filenames:
            if not f.startswith("."):
                out.append((rel / f).as_posix())
    return sorted(out)


def list_images(folder: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) under `folder`, both sorted relative POSIX paths."""
    files = list_files(folder)
    return [f for f in files if is_image_name(f)], [f for f in files if not is_image_name(f)]


_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device",
          stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket"}


def entry_problem(path: str | Path) -> str | None:
    """Why the folder entry `path` holds no file content to read, or None when it does.

    A regular file, or a symbolic link to one, has content (the link's target's). Anything else
    (a dangling or looping link, a link to a folder or a device, a FIFO, a socket) has none: DVC
    cannot hash it, and opening a FIFO would wait forever.
    """
    link = os.path.islink(path)
    try:
        st = os.stat(path)  # follows links
    except OSError as e:
        if e.errno == errno.ENOENT and link:
            return f"dangling symbolic link (its target {os.readlink(path)} does not exist)"
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot read ({e.strerror})"
    kind = stat.S_IFMT(st.st_mode)
    if kind != stat.S_IFREG:
        what = _KINDS.get(kind, "a special file")
        return (f"symbolic link to {what} ({os.readlink(path)}), not to a file" if link
                else f"{what}, not a file")
    if not os.access(path, os.R_OK):
        return "cannot read (permission denied)"
    return None


def list_entries(folder: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(files with content, [(entry, why it has none)]) under `folder`, as sorted relative POSIX paths.

    Like list_files, hidden entries are skipped; links to files count as files. Links to folders
    are listed as problems, not followed (os.walk would silently leave them out): a dataset
    that reaches outside its folder through them is not what DVC tracks.
    """
    files: list[str] = []
    problems: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            dirnames.remove(d)
            problems.append(((rel / d).as_posix(), str(entry_problem(os.path.join(dirpath, d)))))
        for f in filenames:
            if f.startswith("."):
                continue
            problem = entry_problem(os.path.join(dirpath, f))
            if problem:
                problems.append(((rel / f).as_posix(), problem))
            else:
                files.append((rel / f).as_posix())
    return sorted(files), sorted(problems)


def _scale_to_uint8(a: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Map high-bit-depth values to 0..255 by scaling (clipping would turn most images white)."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if full_scale is None:  # no known range: stretch what is there
        lo, hi = float(a.min()), float(a.max())
        a, full_scale = a - lo, (hi - lo) or 1.0
    return np.clip(np.rint(a * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited over `background`."""
    mode = im.mode
    if mode == "RGB" and not im.has_transparency_data:
        return im
    if mode.startswith("I;16"):
        # 16-bit grayscale (PNG, TIFF): 65535 is white.
        return Image.fromarray(_scale_to_uint8(np.asarray(im), 65535.0), "L").convert("RGB")
    if mode == "I":
        # 32-bit integer mode; in practice 16-bit data widened by the decoder. Outside that range
        # there is no convention, so the values are stretched.
        a = np.asarray(im)
        full = 65535.0 if a.size and a.min() >= 0 and a.max() <= 65535 else None
        return Image.fromarray(_scale_to_uint8(a, full), "L").convert("RGB")
    if mode == "F":
        # Float images are conventionally 0..1; anything else is stretched.
        a = np.asarray(im)
        finite = a[np.isfinite(a)]
        full = 1.0 if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1) else None
        return Image.fromarray(_scale_to_uint8(a, full), "L").convert("RGB")
    if im.has_transparency_data:
        # RGBA, LA, PA, P/L/RGB with a tRNS chunk: Pillow turns all of them into RGBA.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        # 1, L, P, CMYK, YCbCr, RGBX, HSV, ...
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImage(f"unsupported colour mode {mode} ({e})") from None


def open_rgb(path: str | Path, *, min_size: int = 1, background: tuple[int, int, int] = (255, 255, 255),
             max_pixels: int | None = None) -> Image.Image:
    """Decode `path` into an upright RGB image, or raise BadImage with the reason."""
    return _open(path, min_size, background, max_pixels)[0]


def _open(path: str | Path, min_size: int, background: tuple[int, int, int],
          max_pixels: int | None) -> tuple[Image.Image, str]:
    """(upright RGB image, the file's own mode)."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file")
        # Pillow warns between its limit and twice its limit; here a warning is a refusal.
        # (catch_warnings is process-global: prepare decodes in processes, not threads.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                # Checked on the header, before the pixels are decoded into memory.
                if w * h > max_pixels:
                    raise BadImage(f"decompression bomb: {w}x{h} pixels exceeds the cap of {max_pixels}")
                if min(w, h) < min_size:
                    raise BadImage(f"too small: {w}x{h}, smaller than crop_size {min_size}")
                im.load()
    except BadImage:
        raise
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise BadImage(f"cannot read ({e.strerror})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (Pillow cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        # What Pillow's decoders raise on truncated or corrupt data, depending on the format.
        raise BadImage(f"truncated or corrupt ({type(e).__name__}: {e})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels unusable
        pass
    return to_rgb(im, background), im.mode


def pixel_hash(im: Image.Image) -> str:
    """Content hash of decoded pixels: finds duplicates even when re-saved with other metadata."""
    h = hashlib.sha256(f"{im.mode}{im.size}".encode())
    h.update(im.tobytes())
    return h.hexdigest()


def resize_square(im: Image.Image, size: int) -> np.ndarray:
    """The official resize to size x size (aspect ratio not kept), as uint8 (size, size, 3)."""
    if im.size != (size, size):
        im = im.resize((size, size), RESAMPLE)
    return np.asarray(im, dtype=np.uint8)


@dataclass(frozen=True)
class Job:
    """One file to load; plain values so it pickles cheaply to worker processes."""

    path: str
    size: int
    min_size: int
    background: tuple[int, int, int]
    max_pixels: int


@dataclass
class Loaded:
    pixels: np.ndarray | None  # (size, size, 3) uint8, None when the image is bad
    reason: str | None  # why the image is bad
    sha256: str | None  # pixel_hash of the decoded, upright RGB image
    mode: str | None  # the file's Pillow mode before conversion


def load(job: Job) -> Loaded:
    """Decode, convert and resize one file; never raises for a bad image (see Loaded.reason)."""
    try:
        im, mode = _open(job.path, job.min_size, job.background, job.max_pixels)
    except BadImage as e:
        return Loaded(None, str(e), None, None)
    return Loaded(resize_square(im, job.size), None, pixel_hash(im), mode)
