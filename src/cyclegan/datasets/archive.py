"""Extracting a zip safely: no paths outside the target, no links or devices, no zip bombs."""
from __future__ import annotations

import re
import stat
import zipfile
import zlib
from pathlib import Path

from ..errors import UserError
from ..prepared_data import SPLITS, TARGET_SPLITS
from .registry import URL_ENV
from .sources import FOLDER_LAYOUT

# Archive caps (zip bombs). The largest official archive, maps, holds ~4400 files and ~1.4 GB.
MAX_ARCHIVE_FILES = 100_000
MAX_ARCHIVE_BYTES = 16 << 30
CHUNK = 1 << 20  # bytes per read while extracting


def _unsafe(info: zipfile.ZipInfo) -> str | None:
    """Why extracting this member could write outside the target or create a special file."""
    name = info.filename.replace("\\", "/")
    if "\x00" in name:
        return "has a NUL byte in its name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in name.split("/"):
        return "climbs out of the target folder (..)"
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "is a symbolic link"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "is a device or other special file"
    if info.flag_bits & 0x1:
        return "is encrypted"
    return None


def _member_path(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _is_data(parts: list[str]) -> bool:
    # macOS archivers add __MACOSX/ and ._name resource forks; hidden entries are never data.
    return bool(parts) and parts[0] != "__MACOSX" and not any(p.startswith(".") for p in parts)


def safe_extract(archive: Path, dest: Path, *, label: str, max_files: int | None = None,
                 max_bytes: int | None = None) -> None:
    """Extract the split folders of a zip into the empty folder `dest`, or raise UserError.

    Every member is checked from the central directory before anything is written (paths,
    types, count, declared total size), and bytes are counted again while extracting because
    declared sizes can lie. Official zips have a top folder (<name>/trainA/...); zips without
    one are accepted too. Members outside the split folders are not extracted.
    """
    max_files = MAX_ARCHIVE_FILES if max_files is None else max_files
    max_bytes = MAX_ARCHIVE_BYTES if max_bytes is None else max_bytes
    corrupt = f"delete it and download again, or check what {URL_ENV} points to"
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise UserError(f"{label}: not a valid zip archive ({e}); {corrupt}") from None
    with zf:
        members = zf.infolist()
        if len(members) > max_files:
            raise UserError(f"{label}: refused, it holds {len(members)} entries, more than the cap of "
                            f"{max_files} (zip bomb?)")
        declared = 0
        for info in members:
            problem = _unsafe(info)
            if problem:
                raise UserError(f"{label}: refused, member {info.filename!r} {problem} (unsafe archive)")
            declared += info.file_size
        if declared > max_bytes:
            raise UserError(f"{label}: refused, it would unpack to {declared} bytes, more than the cap "
                            f"of {max_bytes} (zip bomb?)")

        files = [(info, _member_path(info.filename)) for info in members if not info.is_dir()]
        files = [(info, parts) for info, parts in files if _is_data(parts)]
        # Where the split folders are: at the top, or under a single folder (<name>/trainA/...).
        if {parts[0] for _, parts in files if len(parts) > 1} & set(SPLITS):
            top = None
        else:
            tops = {parts[0] for _, parts in files if len(parts) > 2 and parts[1] in SPLITS}
            if len(tops) != 1:
                raise UserError(f"{label}: no {FOLDER_LAYOUT} folders in the archive (at its top or "
                                f"under one folder); {corrupt}")
            top = tops.pop()
        wanted = set(SPLITS) | set(TARGET_SPLITS)
        plan = []
        for info, parts in files:
            if top is not None:
                if parts[0] != top:
                    continue
                parts = parts[1:]
            if len(parts) >= 2 and parts[0] in wanted:
                plan.append((info, dest.joinpath(*parts)))

        written = 0
        for info, target in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "xb") as out:
                    size = 0
                    while chunk := src.read(CHUNK):
                        size += len(chunk)
                        written += len(chunk)
                        if size > info.file_size or written > max_bytes:
                            raise UserError(f"{label}: refused, {info.filename!r} unpacks to more bytes "
                                            f"than declared, or the archive to more than the cap of "
                                            f"{max_bytes} bytes (zip bomb?)")
                        out.write(chunk)
            except FileExistsError:
                raise UserError(f"{label}: refused, {info.filename!r} appears twice in the archive") from None
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
                raise UserError(f"{label}: corrupt archive at {info.filename!r} ({e}); {corrupt}") from None
            except OSError as e:
                # Reading a truncated member can raise a plain OSError too; the file name tells.
                raise UserError(f"{label}: cannot extract {info.filename!r} to {target} ({e}); {corrupt} "
                                f"or free disk space") from None
