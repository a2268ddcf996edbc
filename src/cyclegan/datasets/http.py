"""Resumable HTTP downloads with retries, and where a mirror variable points.

The dataset downloads (registry.py) and the authors' generators (cyclegan.generator_authors) use them.
"""
from __future__ import annotations

import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..errors import UserError

# Base delay in seconds between retries (doubled at each failed attempt); tests set it tiny.
BACKOFF_ENV = "CYCLEGAN_DOWNLOAD_BACKOFF"
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
RETRIES = 5  # consecutive failed attempts without progress before giving up
TIMEOUT_S = 60.0  # per socket operation (connect, each read), not for the whole file
CHUNK = 1 << 20


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
                  url_env: str, check: str = "data.dataset") -> None:
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
            resume = (f"; the {kept} bytes fetched are kept in {part} for the next run to resume"
                      if kept else "")
            raise UserError(f"cannot download {url} ({error}; {retries} attempts); {fix}{resume}")
        delay = min(backoff * 2 ** (failures - 1), MAX_BACKOFF_S)
        print(f"{url}: {error}; retrying in {delay:.3g} s", file=sys.stderr)
        time.sleep(delay)


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
