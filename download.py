"""The one download path of the project: every file it fetches (pretraining shards, task data,
the CORE bundle) and the small requests around them (file lists) go through here.

    download_file(url, path, validate=check)   # resumes path.part, retries, checks size and sha256
    request(url).json()                         # a small request; an unreachable host fails at once

Dropped or timed-out connections, HTTP 429/5xx and bad bytes are retried with exponential backoff
(cut short by Ctrl-C); other HTTP errors fail at once.
"""

import hashlib
import os
import re
import threading
from pathlib import Path
from urllib.parse import urlparse

from common import file_lock

stop = threading.Event()  # set on Ctrl-C so the download threads stop between chunks
UNREACHABLE = ("DNS lookup failed", "connection refused", "network unreachable", "no route to host",
               "connect timed out")
REASONS = (("Name or service not known", "DNS lookup failed"), ("Failed to resolve", "DNS lookup failed"),
           ("NameResolution", "DNS lookup failed"), ("Connection refused", "connection refused"),
           ("Network is unreachable", "network unreachable"), ("No route to host", "no route to host"))


class DownloadError(Exception):
    """A download that failed for `reason` (a few words) after `attempts` tries."""

    def __init__(self, message, reason=None, attempts=1):
        super().__init__(message)
        self.reason, self.attempts = reason or message, attempts


class _Retry(Exception):
    """Worth another attempt, which resumes the partial file."""


class _Restart(_Retry):
    """Worth another attempt from zero: the partial file cannot be trusted."""


def network_reason(e: Exception) -> str:
    """A few words for why a request failed (the exception's own text is a page long)."""
    import requests

    text = str(e)
    reason = next((reason for needle, reason in REASONS if needle in text), None)
    if reason is None and isinstance(e, requests.ConnectTimeout):
        reason = "connect timed out"
    return reason or ("timed out" if "timed out" in text.lower() else type(e).__name__)


def _retrying(attempt, url, retries, backoff, fail_fast):
    """attempt() until it returns, at most retries + 1 times; an unreachable host fails at once
    when `fail_fast` (the first request of a job: we are offline)."""
    import requests

    reason = "interrupted"
    for i in range(retries + 1):
        if i:
            stop.wait(min(backoff * 2 ** (i - 1), 60.0))
        if stop.is_set():
            break
        try:
            return attempt()
        except requests.RequestException as e:
            reason = network_reason(e)
            if fail_fast and reason in UNREACHABLE:
                raise DownloadError(f"cannot reach {urlparse(url).netloc} ({reason})", reason)
        except _Retry as e:
            reason = str(e)
    raise DownloadError(f"{Path(urlparse(url).path).name}: {reason} (after {i + 1} attempts)", reason, i + 1)


def _check_status(r, url):
    if r.status_code >= 400:  # 429 and 5xx are worth retrying, other errors are final
        retry = r.status_code == 429 or r.status_code >= 500
        raise _Retry(f"HTTP {r.status_code}") if retry else DownloadError(f"HTTP {r.status_code} for {url}",
                                                                          f"HTTP {r.status_code}")


def request(url, method="GET", retries=5, backoff=2.0, timeout=60.0, headers=None):
    """A small request (a file list, a probe) with the retry rules above; an unreachable host fails at once."""
    import requests

    def attempt():
        r = requests.request(method, url, headers=headers, timeout=(10, timeout), allow_redirects=True)
        _check_status(r, url)
        return r

    return _retrying(attempt, url, retries, backoff, fail_fast=True)


def _published_sha256(response):
    """The sha256 the server publishes for the file, if any: the Hugging Face Hub sends the LFS
    object id (the content's sha256) as X-Linked-Etag on its redirect to the storage."""
    for r in (*response.history, response):
        tag = r.headers.get("X-Linked-Etag", "").removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return tag
    return None


def _fetch(url: str, part: Path, timeout: float, headers: dict | None = None):
    """One attempt: append to `part` from where it stops (HTTP Range), then check the complete file
    against the size the server reports and the sha256 it publishes."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    headers = {**(headers or {}), "Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    with requests.get(url, headers=headers, stream=True, timeout=(10, timeout)) as r:
        if r.status_code == 416:
            raise _Restart("the server refused to resume (HTTP 416)")
        _check_status(r, url)
        sha256, total = _published_sha256(r), r.headers.get("Content-Length")
        if r.status_code == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", r.headers.get("Content-Range", "").strip())
            if not m or int(m.group(1)) != have:
                raise _Restart(f"the server resumed with Content-Range {r.headers.get('Content-Range')!r}, not at {have}")
            total = m.group(2)
        with open(part, "ab" if r.status_code == 206 else "wb") as f:  # 200: the whole file, from zero
            for chunk in r.iter_content(chunk_size=1 << 16):  # small: a dropped connection loses < 64 KB
                if stop.is_set():
                    raise DownloadError("interrupted")
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None and size != int(total):
        raise (_Retry if size < int(total) else _Restart)(f"got {size} of {total} bytes")
    if sha256 is not None and _sha256(part) != sha256:
        raise _Restart("the content does not match the sha256 the server publishes")


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, path: Path, retries: int = 5, backoff: float = 2.0, timeout: float = 60.0,
                  validate=None, headers: dict | None = None) -> Path:
    """Download `url` to `path`: resume a partial `path.part`, retry (see _retrying), verify the size,
    the published sha256 and `validate(file)` (raises ValueError on a bad file) -- bytes that fail a
    check are thrown away and fetched again from zero -- then rename into place. Never leaves a bad
    `path`; another process downloading the same file waits for this one."""
    part = path.with_name(path.name + ".part")

    def attempt():
        try:
            _fetch(url, part, timeout, headers)
            if validate is not None:
                validate(part)
        except (_Restart, ValueError) as e:
            part.unlink(missing_ok=True)
            raise _Retry(str(e))
        os.replace(part, path)
        return path

    with file_lock(path.with_name(f".{path.name}.lock")):
        return path if is_valid(path, validate) else _retrying(attempt, url, retries, backoff, fail_fast=False)


def is_valid(path: Path, validate) -> bool:
    """`path` exists and passes validate(path) (None: any file)."""
    try:
        if validate is not None:
            validate(path)  # raises on a missing or bad file
        return path.exists()
    except (OSError, ValueError):
        return False
