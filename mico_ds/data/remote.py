"""Remote shards: ``http(s)://`` bodies read as streams, and the retries of a remote shard that fails.

A remote shard is an ``http://`` / ``https://`` URL (opened here with the standard library's
``urllib.request``, streaming, never held in memory) or a ``pipe:CMD`` command (``pipe:curl -s ...``,
``pipe:aws s3 cp ... -``: opened by ``mico_ds.data.io.iter_tar``). Networks and object stores fail
transiently, so a remote shard whose read fails -- connection refused, an HTTP error status, a
connection dropped mid-transfer (a truncated tar), a command exiting non-zero -- is read again after a
back-off (:func:`iter_with_retries`). A shard's bytes are the same on every read, so the samples
already handed on are read again and dropped: the stream is the one an undisturbed read gives, which
keeps a stream's position (docs/architecture.md, "Data contract") exact. A shard that fails on every
attempt becomes one error marker with the reason :data:`SHARD_FAILED` naming its URL (a counted skip;
the bound on such shards is ``data.max_failed_shards``, enforced in ``mico_ds.data.read.stream``).

Local files are not retried: a missing or corrupt file reads the same the next time
(``shard_error`` / ``truncated_tar`` as before).
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.request
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

SHARD_FAILED = "shard_failed"  # the skip reason of a remote shard that failed on every attempt
HTTP_TIMEOUT_S = 60.0  # per socket operation (connect, each read): a stalled server is a failed read
BACKOFF_CAP_S = 60.0  # the longest wait between two attempts
USER_AGENT = "mico_ds"


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def is_remote(url: str) -> bool:
    """An ``http(s)://`` URL or a ``pipe:`` command: what is retried when it fails."""
    return is_http(url) or url.startswith("pipe:")


class HttpBody:
    """The body of an HTTP response as a binary stream that raises on a short body.

    ``http.client`` returns ``b""`` when the server closes the connection before Content-Length bytes
    (for compatibility it does not raise), and a tar cut exactly at a member boundary then reads as a
    complete, shorter archive. This wrapper counts the bytes and raises ``ConnectionError`` instead, so
    a dropped transfer is always a failed read. ``http.client`` errors (a broken chunked body) are
    raised as ``OSError``, which the tar reader handles.
    """

    def __init__(self, response: http.client.HTTPResponse, url: str) -> None:
        self.response = response
        self.url = url
        self.expected = response.length  # Content-Length, None for a chunked body
        self.received = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.response.read(None if n is None or n < 0 else n)
        except http.client.HTTPException as e:
            raise OSError(f"{type(e).__name__}: {e} after {self.received} bytes") from e
        self.received += len(data)
        if not data and n != 0 and self.expected is not None and self.received < self.expected:
            raise ConnectionError(
                f"connection closed after {self.received} of {self.expected} bytes (Content-Length)"
            )
        return data

    def close(self) -> None:
        self.response.close()


def open_http(url: str, timeout: float = HTTP_TIMEOUT_S) -> HttpBody:
    """A streaming reader of ``url``'s body.

    Raises:
        OSError: connection errors, timeouts and HTTP error statuses (``urllib.error.HTTPError``,
            e.g. ``HTTP Error 500: Internal Server Error``).
    """
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) only
    except http.client.HTTPException as e:  # a malformed response: a failed read like any other
        raise OSError(f"{type(e).__name__}: {e}") from e
    return HttpBody(response, url)


def backoff_s(attempt: int, base: float) -> float:
    """Seconds to wait before attempt ``attempt`` (1 = the first retry): base, 2 base, 4 base, ...
    capped at :data:`BACKOFF_CAP_S`."""
    return min(BACKOFF_CAP_S, base * 2 ** (attempt - 1))


def iter_with_retries(
    url: str,
    read: Callable[[str], Iterator[dict]],
    retries: int,
    backoff: float,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict]:
    """``read(url)``'s items (samples, then possibly one ``__error__`` marker), a remote shard's read
    repeated up to ``retries`` times after a failure (a marker), each time after :func:`backoff_s`.

    A retry skips the samples already yielded (the same first samples of the same bytes), so the
    result is the shard's samples once each, in file order. A remote shard that fails on every attempt
    ends with one marker ``{"__error__": "shard_failed", "__key__": url, "__url__": url,
    "__detail__": "N attempts, last: REASON: DETAIL"}`` after the samples of its longest read, and a
    warning naming the URL. A local path is read once, its markers unchanged.
    """
    if not is_remote(url):
        yield from read(url)
        return
    done = 0  # samples of this shard already yielded
    last: dict = {}
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff_s(attempt, backoff)
            log.info(
                "shard %s: attempt %d of %d failed (%s: %s); retrying in %.3g s",
                url, attempt, retries + 1, last["__error__"], last["__detail__"], wait,
            )  # fmt: skip
            sleep(wait)
        failed = None
        for n, item in enumerate(read(url), 1):
            if "__error__" in item:
                failed = item
                break
            if n > done:  # the first `done` samples were handed on by an earlier attempt
                done = n
                yield item
        if failed is None:
            if attempt:
                log.info("shard %s: read completely on attempt %d", url, attempt + 1)
            return
        last = failed
    detail = f"{retries + 1} attempts, last: {last['__error__']}: {last['__detail__']}"
    log.warning("shard %s failed, skipped (%s): %s", url, SHARD_FAILED, detail)
    yield {"__error__": SHARD_FAILED, "__key__": url, "__url__": url, "__detail__": detail}
