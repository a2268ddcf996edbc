"""A user's dataset folder: checked for trainA/ trainB/ testA/ testB/ and copied into data/raw/<name>.

Hard links when possible; links to files are followed; entries that are not files are left out
and listed (data.on_bad_image: skip) or stop the stage (fail).
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_dir
from ..images import IMG_EXTENSIONS, entry_problem, is_image_name, list_entries
from ..paths import DATA_REPORT
from ..prepared_data import SPLITS, TARGET_SPLITS
from .markers import fmt_counts, split_counts, write_marker
from .sources import FOLDER_LAYOUT


def check_folder(path: Path, key: str = "data.dataset") -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """A dataset folder holds one folder of images per split; name what is missing.

    Returns scan_folder(path): the images of each split, and the entries left out.
    """
    if not path.is_dir():
        raise UserError(f"{key}: folder {path} not found; give the path of a folder holding {FOLDER_LAYOUT}")
    missing = [f"{s}/" for s in SPLITS if not (path / s).is_dir()]
    if missing:
        raise UserError(
            f"{key}: {path} has no {', '.join(missing)}; a dataset folder holds {FOLDER_LAYOUT} "
            f"(the images of domain A and B, for training and for testing)"
        )
    found, skipped = scan_folder(path)
    for s in SPLITS:
        if not found[s]:
            bad = [x for x in skipped if x["file"].startswith(f"{s}/")]
            also = (f"; {len(bad)} entries there are not files, e.g. {bad[0]['file']}: {bad[0]['reason']}"
                    if bad else "")
            raise UserError(
                f"{key}: {path / s} holds no images (looked for {', '.join(IMG_EXTENSIONS)}){also}; "
                f"put the {s} images there"
            )
    return found, skipped


def scan_folder(src: Path) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """({split: image files}, [{"file": "<split>/<entry>", "reason": ...}]) of a dataset folder.

    The second list holds the entries without file content (dangling links, links to folders or
    devices, FIFOs, sockets; images.entry_problem), whatever their names: none may be copied,
    and each is reported like a bad image. A split folder may itself be a link.
    """
    found: dict[str, list[str]] = {}
    skipped: list[dict[str, str]] = []
    for split in (*SPLITS, *TARGET_SPLITS):
        if not (src / split).is_dir():
            continue
        files, problems = list_entries(src / split)
        found[split] = [f for f in files if is_image_name(f)]
        skipped += [{"file": f"{split}/{rel}", "reason": why} for rel, why in problems]
    return found, skipped


def _link_or_copy(src: Path, dest: Path, found: Mapping[str, list[str]]) -> int:
    """Put the files `found` of src into dest; returns the file count.

    Hard links make this instant and free when src is on the same file system. A symbolic link
    is followed: its target's content is linked or copied, never the link itself, which DVC
    would follow later (and fail on, once it dangles, or from its new place if relative).
    """
    n = 0
    for split, files in found.items():
        for rel in files:
            s, d = src / split / rel, dest / split / rel
            d.parent.mkdir(parents=True, exist_ok=True)
            try:
                # The link's target: link(2) would link the symbolic link itself, whatever
                # os.link's follow_symlinks says.
                os.link(os.path.realpath(s), d)
            except OSError:  # other file system, or a file we may not link (not ours, read-only)
                try:
                    shutil.copyfile(s, d)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise  # the destination is full: the cli says so in one line
                    raise UserError(f"{s}: cannot read ({e.strerror}); fix or remove the file") from None
            if not stat.S_ISREG(os.lstat(d).st_mode):  # replaced since it was scanned
                raise UserError(f"{s}: changed while being copied, to {entry_problem(s) or 'another file'}; "
                                f"run again once the folder stays as it is")
            n += 1
    return n


def copy_images(src: Path, dest: Path) -> tuple[int, list[dict[str, str]]]:
    """Copy the image files of every split folder of `src` into `dest`: (file count, entries left out)."""
    found, skipped = scan_folder(src)
    return _link_or_copy(src, dest, found), skipped


def import_folder(src: Path, dest: Path, on_bad_image: str = "skip") -> str:
    """Validate a user's dataset folder and copy it into data/raw/<name>.

    Entries without file content are left out and listed in the marker, from which `prepare`
    adds them to its data report; with on_bad_image "fail" the first one stops the stage
    before anything is written.
    """
    found, skipped = check_folder(src)
    if skipped and on_bad_image == "fail":
        first = skipped[0]
        raise UserError(f"{src / first['file']}: {first['reason']}; remove it or put the file itself there, "
                        f"or set data.on_bad_image: skip in params.yaml")
    with atomic_dir(dest) as tmp:
        n = _link_or_copy(src, tmp, found)
        counts = split_counts(tmp)
        write_marker(tmp, {"kind": "folder", "dataset": dest.name, "source": str(src.resolve()),
                           "counts": counts, "skipped": skipped})
    message = f"{dest}: copied {n} images from {src} ({fmt_counts(counts)})"
    if skipped:
        first = skipped[0]
        message += (f"; skipped {len(skipped)} entries that are not files (e.g. {first['file']}: "
                    f"{first['reason']}), "
                    f"listed in {DATA_REPORT} by prepare")
    return message
