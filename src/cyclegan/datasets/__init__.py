"""Where a dataset comes from, and getting it into data/raw/<name>/ safely.

data.dataset is one of
  toy_horse2zebra      generated offline (stages/download.py calls toy.generate)
  a registry name      the CycleGAN authors' zip: downloaded (resumable, retried), extracted with
                       zip-slip and zip-bomb checks, verified (sha256 list or official file counts)
  a folder path        checked for trainA/ trainB/ testA/ testB/ and copied (hard links when possible);
                       links to files are followed, entries that are not files are left out and
                       listed (data.on_bad_image: skip) or stop the stage (fail)

data/raw/<name> is only ever replaced whole (fileio.atomic_dir), after the new content is complete
and verified: a failure at any point leaves it as it was. The download itself goes to
data/raw/.<name>.zip.part, which stays after a network failure so the next run resumes it, and is
deleted once the archive has been extracted or rejected.

CYCLEGAN_DATASETS_URL replaces the authors' server: another http(s):// base, a file:// URL, or a
local folder holding <name>.zip or an already extracted <name>/.
"""
from __future__ import annotations

import errno
import http.client
import json
import os
import re
import shutil
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from . import toy
from ..prepared_data import SPLITS, TARGET_SPLITS, dataset_name
from ..errors import UserError
from ..fileio import atomic_dir, sha256_file
from ..images import IMG_EXTENSIONS, entry_problem, is_image_name, list_entries, list_files, list_images
from ..paths import DATA_REPORT

BASE_URL = "https://efrosgans.eecs.berkeley.edu/cyclegan/datasets"
URL_ENV = "CYCLEGAN_DATASETS_URL"
# Base delay in seconds between retries (doubled at each failed attempt); tests set it tiny.
BACKOFF_ENV = "CYCLEGAN_DOWNLOAD_BACKOFF"
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
RETRIES = 5  # consecutive failed attempts without progress before giving up
TIMEOUT_S = 60.0  # per socket operation (connect, each read), not for the whole file
CHUNK = 1 << 20

# Archive caps (zip bombs). The largest official archive, maps, holds ~4400 files and ~1.4 GB.
MAX_ARCHIVE_FILES = 100_000
MAX_ARCHIVE_BYTES = 16 << 30

MARKER = ".cyclegan.json"  # inside data/raw/<name>: where the content came from, what was checked


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    # Image files per split in the official zip; None where not known (then each split must
    # just be non-empty).
    counts: Mapping[str, int] | None = None
    # Package resource listing the sha256 of every file ("<sha>  ./testA/x.jpg").
    sha256sums: str | None = None


def _counts(train_a: int, train_b: int, test_a: int, test_b: int) -> dict[str, int]:
    return {"trainA": train_a, "trainB": train_b, "testA": test_a, "testB": test_b}


# Counts of the official zips as published in the TensorFlow Datasets catalog (cycle_gan), which
# are built from the same files; horse2zebra's also match its SHA256SUMS list.
REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("apple2orange", _counts(995, 1019, 266, 248)),
        DatasetInfo("summer2winter_yosemite", _counts(1231, 962, 309, 238)),
        DatasetInfo("horse2zebra", _counts(1067, 1334, 120, 140), "horse2zebra.SHA256SUMS"),
        DatasetInfo("monet2photo", _counts(1072, 6287, 121, 751)),
        DatasetInfo("cezanne2photo", _counts(525, 6287, 58, 751)),
        DatasetInfo("ukiyoe2photo", _counts(562, 6287, 263, 751)),
        DatasetInfo("vangogh2photo", _counts(400, 6287, 400, 751)),
        DatasetInfo("maps", _counts(1096, 1096, 1098, 1098)),
        DatasetInfo("facades", _counts(400, 400, 106, 106)),
        DatasetInfo("iphone2dslr_flower", _counts(1812, 3325, 569, 480)),
        DatasetInfo("ae_photos"),  # no published counts
    )
}

REFUSED = {
    "cityscapes": (
        "cityscapes cannot be downloaded: its licence does not allow redistribution. Register at "
        "https://www.cityscapes-dataset.com, download it there, arrange it as trainA/ trainB/ testA/ "
        "testB/ (the CycleGAN authors' datasets/prepare_cityscapes_dataset.py does this) and set "
        "data.dataset to that folder's path"
    ),
}

FOLDER_LAYOUT = "trainA/ trainB/ testA/ testB/"


def known_names() -> list[str]:
    return [toy.NAME, *REGISTRY]


@dataclass(frozen=True)
class Source:
    kind: str  # "toy", "registry" or "folder"
    name: str  # the folder name under data/raw and data/prepared
    info: DatasetInfo | None = None
    path: Path | None = None


def resolve(dataset: str) -> Source:
    """Interpret data.dataset; unknown names and unusable paths are a UserError."""
    if dataset == toy.NAME:
        return Source("toy", dataset)
    if dataset in REFUSED:
        raise UserError(f"data.dataset: {REFUSED[dataset]}")
    if dataset in REGISTRY:
        return Source("registry", dataset, info=REGISTRY[dataset])
    path = Path(dataset).expanduser()
    if "/" in dataset or os.sep in dataset or dataset.startswith((".", "~")) or path.is_dir():
        name = dataset_name(dataset)
        # The name becomes a folder under data/raw: it must be a plain, visible folder name.
        if name in ("", ".", "..") or name.startswith("."):
            raise UserError(
                f"data.dataset: {dataset!r} does not end in a folder name; write the folder's path "
                f"with its name, e.g. ../my_data"
            )
        return Source("folder", name, path=path)
    raise UserError(
        f"data.dataset: unknown dataset {dataset!r}; use one of {', '.join(known_names())}, "
        f"or the path of a folder holding {FOLDER_LAYOUT} (e.g. ./my_data)"
    )


# --------------------------------------------------------------------------------------------
# Markers: what data/raw/<name> holds


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_marker(folder: Path, data: dict) -> None:
    (folder / MARKER).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def split_counts(root: Path, splits: tuple[str, ...] = SPLITS) -> dict[str, int]:
    return {s: len(list_images(root / s)[0]) if (root / s).is_dir() else 0 for s in splits}


# --------------------------------------------------------------------------------------------
# Folders


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
        write_marker(tmp, {"kind": "folder", "dataset": dest.name, "source": str(src.resolve()), "counts": counts,
                           "skipped": skipped})
    message = f"{dest}: copied {n} images from {src} ({_fmt_counts(counts)})"
    if skipped:
        first = skipped[0]
        message += (f"; skipped {len(skipped)} entries that are not files (e.g. {first['file']}: {first['reason']}), "
                    f"listed in {DATA_REPORT} by prepare")
    return message


def _fmt_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


# --------------------------------------------------------------------------------------------
# Download


def backoff_s() -> float:
    raw = os.environ.get(BACKOFF_ENV)
    if raw is None:
        return DEFAULT_BACKOFF_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise UserError(f"{BACKOFF_ENV}={raw!r}: must be a number of seconds >= 0")
    return value


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """'bytes 100-199/200' -> (100, 200); total None when the server sends '*'."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m.group(1)), None if m.group(2) == "*" else int(m.group(2))


def _fetch_once(url: str, part: Path, timeout: float, desc: str) -> bool:
    """One request for the rest of `part`; True when the file is complete."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": f"cyclegan/{__version__}"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            parsed = _content_range(resp.headers.get("Content-Range"))
            if parsed is None or parsed[0] != have:
                # Not the range we asked for: start again from zero on the next attempt.
                part.unlink(missing_ok=True)
                return False
            offset, total = parsed
        else:
            # 200: the whole file, also from servers that ignore Range; what we had is dropped.
            offset, total = 0, int(length) if length is not None else None
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=desc, disable=None, leave=False,
        ) as bar:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size > total:  # cannot be a prefix of the file any more
        part.unlink(missing_ok=True)
        return False
    # http.client returns short reads, not an error, when a connection drops mid-body.
    return total is None or size == total


def http_download(url: str, part: Path, *, name: str, retries: int | None = None,
                  backoff: float | None = None, timeout: float | None = None, file_name: str | None = None,
                  url_env: str = URL_ENV, check: str = "data.dataset") -> None:
    """Download `url` into `part`, resuming what is there; retries 5xx and network failures.

    Defaults come from the module constants (and CYCLEGAN_DOWNLOAD_BACKOFF) at call time. The
    messages name `file_name` (default <name>.zip), the mirror variable `url_env` and, for a 404,
    what to `check`: other downloads (the authors' generators) say theirs.
    """
    retries = RETRIES if retries is None else retries
    backoff = backoff_s() if backoff is None else backoff
    timeout = TIMEOUT_S if timeout is None else timeout
    file_name = file_name or f"{name}.zip"
    part.parent.mkdir(parents=True, exist_ok=True)
    fix = (
        f"check the network, or set {url_env} to a mirror, a file:// URL or a local folder "
        f"holding {file_name}"
    )
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            if _fetch_once(url, part, timeout, file_name):
                return
            error = "the connection closed before the end of the file"
        except urllib.error.HTTPError as e:
            if e.code in (404, 410):
                part.unlink(missing_ok=True)
                raise UserError(f"{url}: not found (HTTP {e.code}); check {check}, or set {url_env} "
                                f"to a server or folder that holds {file_name}") from None
            if e.code == 416:  # our partial file is not a prefix the server knows: start over
                part.unlink(missing_ok=True)
            elif e.code < 500 and e.code not in (408, 429):
                raise UserError(f"{url}: HTTP {e.code} {e.reason}; {fix}") from None
            error = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            # Refused or dropped connections, timeouts, DNS failures, broken chunked bodies.
            reason = getattr(e, "reason", None) or e
            error = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
        progressed = part.exists() and part.stat().st_size > before
        failures = 1 if progressed else failures + 1
        if failures >= retries and not progressed:
            kept = part.stat().st_size if part.exists() else 0
            resume = f"; the {kept} bytes fetched are kept in {part} for the next run to resume" if kept else ""
            raise UserError(f"cannot download {url} ({error}; {retries} attempts); {fix}{resume}")
        delay = min(backoff * 2 ** (failures - 1), MAX_BACKOFF_S)
        print(f"{url}: {error}; retrying in {delay:.3g} s", file=sys.stderr)
        time.sleep(delay)


# --------------------------------------------------------------------------------------------
# Archives


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


# --------------------------------------------------------------------------------------------
# Verification


def load_sha256sums(resource: str) -> dict[str, str]:
    """{"testA/x.jpg": sha256} from a package resource in `sha256sum` format."""
    text = resources.files("cyclegan").joinpath("resources", resource).read_text()
    sums = {}
    for line in text.splitlines():
        if line.strip():
            digest, path = line.split(maxsplit=1)
            sums[path.lstrip("*").removeprefix("./")] = digest.lower()
    return sums


def verify(root: Path, info: DatasetInfo, *, label: str) -> dict[str, int]:
    """Check an extracted dataset against what is known of the official one; returns counts.

    With a sha256 list every file present must be listed and match; the per-split counts then
    make sure none is missing. Tests that serve a subset pass a DatasetInfo with the subset's counts.
    """
    for split in SPLITS:
        if not (root / split).is_dir():
            raise UserError(f"{label}: the archive has no {split}/ folder; it is not a CycleGAN dataset "
                            f"({FOLDER_LAYOUT})")
    if info.sha256sums:
        sums = load_sha256sums(info.sha256sums)
        present = [f"{s}/{rel}" for s in (*SPLITS, *TARGET_SPLITS) if (root / s).is_dir()
                   for rel in list_files(root / s)]
        for rel in present:
            if rel not in sums:
                raise UserError(f"{label}: {rel} is not a file of the official {info.name}; the archive is "
                                f"not the official one: delete it or fix {URL_ENV}")
        # sha256 releases the GIL: two threads keep two cores busy.
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(lambda rel: sha256_file(root / rel), present))
        for rel, digest in zip(present, digests, strict=True):
            if digest != sums[rel]:
                raise UserError(f"{label}: {rel} fails its sha256 check (got {digest[:16]}..., expected "
                                f"{sums[rel][:16]}...); the download is corrupt or modified: download again")
    counts = split_counts(root)
    for split in SPLITS:
        expected = info.counts[split] if info.counts else None
        if expected is not None and counts[split] != expected:
            raise UserError(f"{label}: {split}/ holds {counts[split]} images, the official {info.name} has "
                            f"{expected}; the archive is incomplete or not the official one")
        if not counts[split]:
            raise UserError(f"{label}: {split}/ holds no images; the archive is incomplete")
    return counts


# --------------------------------------------------------------------------------------------
# The registry datasets


def mirror(base: str, env: str) -> str | Path:
    """Where the mirror variable `env`=`base` points: an http(s) base URL (a str, no trailing /),
    or the local folder a file:// URL or a path names."""
    parsed = urllib.parse.urlparse(base)
    if parsed.scheme in ("http", "https"):
        return base.rstrip("/")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise UserError(f"{env}={base}: file:// URLs must name a local folder (file:///path)")
        return Path(urllib.request.url2pathname(parsed.path))
    if len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise UserError(f"{env}={base}: use an http(s):// or file:// URL, or a local folder")
    return Path(base).expanduser()


def _locate(base: str, name: str) -> tuple[str, str | Path]:
    """('http', url) | ('zip', path) | ('dir', path) for <name> under the base location."""
    folder = mirror(base, URL_ENV)
    if isinstance(folder, str):
        return "http", f"{folder}/{name}.zip"
    if not folder.is_dir():
        raise UserError(f"{URL_ENV}={base}: no such folder; point it at a folder holding {name}.zip or "
                        f"{name}/, or unset it to download from {BASE_URL}")
    if (folder / f"{name}.zip").is_file():
        return "zip", folder / f"{name}.zip"
    if (folder / name).is_dir():
        return "dir", folder / name
    raise UserError(f"{URL_ENV}={base}: holds neither {name}.zip nor {name}/; put the dataset there or "
                    f"unset {URL_ENV} to download from {BASE_URL}")


def is_complete(dest: Path, name: str) -> bool:
    """data/raw/<name> holds a verified download whose files are all still there."""
    marker = read_marker(dest)
    return bool(marker and marker.get("kind") == "download" and marker.get("dataset") == name
                and marker.get("counts") == split_counts(dest))


def fetch(info: DatasetInfo, raw_root: Path) -> str:
    """Download (or take from CYCLEGAN_DATASETS_URL), extract and verify into raw_root/<name>."""
    dest = raw_root / info.name
    if is_complete(dest, info.name):
        return f"{dest}: already downloaded and verified; delete the folder to fetch it again"
    base = os.environ.get(URL_ENV) or BASE_URL
    kind, where = _locate(base, info.name)
    label = str(where)
    with atomic_dir(dest) as tmp:
        if kind == "http":
            part = raw_root / f".{info.name}.zip.part"
            http_download(str(where), part, name=info.name)
            # Complete from here on: whatever happens next, the file is not worth resuming.
            try:
                safe_extract(part, tmp, label=label)
                counts = verify(tmp, info, label=label)
            finally:
                part.unlink(missing_ok=True)
        elif kind == "zip":
            safe_extract(Path(where), tmp, label=label)
            counts = verify(tmp, info, label=label)
        else:
            _, skipped = copy_images(Path(where), tmp)
            if skipped:
                raise UserError(f"{label}: {skipped[0]['file']}: {skipped[0]['reason']}; the official "
                                f"{info.name} holds files only: fix that folder, or unset {URL_ENV}")
            counts = verify(tmp, info, label=label)
        checked = ("sha256 of every file" if info.sha256sums
                   else "official file counts" if info.counts else "non-empty splits")
        write_marker(tmp, {"kind": "download", "dataset": info.name, "source": label, "counts": counts,
                           "verified": checked})
    return f"{dest}: fetched from {label}, verified ({checked}): {_fmt_counts(counts)}"
