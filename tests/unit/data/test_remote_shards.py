"""Remote shards that fail (docs/data.md, "Remote shards"): a real HTTP server on 127.0.0.1 serves
real tar shards, drops connections mid-transfer and answers 500; a ``pipe:`` command fails once. What
keeps failing is skipped as ``shard_failed`` and named; what recovers is read whole, nothing twice;
past ``data.max_failed_shards`` the loader stops with an error naming the failed URLs."""

from __future__ import annotations

import logging
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from mico_ds.config import CorpusConfig, DataConfig, InputConfig
from mico_ds.data import schema
from mico_ds.data.io import expand_urls, iter_tar
from mico_ds.data.read.loader import CorpusLoader, EvalLoader
from mico_ds.data.remote import SHARD_FAILED, backoff_s, iter_with_retries
from mico_ds.data.write import media
from mico_ds.data.write.tar import write_tar

INP = InputConfig(image_size=16)
SAMPLES = 4  # per shard
RETRIES = 2

# name -> what the server does with each request of it ("drop" = Content-Length of the whole shard,
# the first bytes up to inside the 3rd sample, then the connection closed)
BEHAVIOUR = {
    "ok0": "ok",
    "ok1": "ok",
    "flaky": "drop:2",  # dropped on the first 2 requests, then served
    "boundary": "boundary:1",  # cut exactly after the 2nd sample's last block once (a "complete" tar)
    "err500": "500",  # always HTTP 500
    "dropped": "drop",  # always dropped mid-transfer
}


def shard_bytes(tmp: Path, name: str) -> bytes:
    rng = np.random.default_rng(len(name))
    samples = [
        (f"{name}_{i}", {"jpg": media.encode_jpeg(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)),
                         "txt": f"{name} picture {i}".encode()})
        for i in range(SAMPLES)
    ]  # fmt: skip
    write_tar(tmp / f"{name}.tar", samples)
    return (tmp / f"{name}.tar").read_bytes()


def cut_points(data: bytes, path: Path) -> tuple[int, int]:
    """(inside the 3rd sample's first member, the end of the 2nd sample's last member's blocks)."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    third = members[4]  # two members per sample
    return third.offset_data + 5, third.offset


class Server:
    """ThreadingHTTPServer on 127.0.0.1:0 serving ``files`` per ``BEHAVIOUR``; counts requests."""

    def __init__(self, tmp: Path, files: dict[str, bytes]) -> None:
        self.files = files
        self.cuts = {n: cut_points(d, tmp / f"{n}.tar") for n, d in files.items()}
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                name = self.path.strip("/").removesuffix(".tar")
                with server.lock:
                    server.requests[name] += 1
                    n = server.requests[name]
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                kind, _, times = BEHAVIOUR[name].partition(":")
                if kind == "500":
                    self.send_error(500)
                    return
                cut = None
                if kind in ("drop", "boundary") and (not times or n <= int(times)):
                    cut = server.cuts[name][0 if kind == "drop" else 1]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data if cut is None else data[:cut])
                self.wfile.flush()
                self.close_connection = True  # HTTP/1.0: the connection ends here, short or not

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"{self.base}/{name}.tar"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    files = {name: shard_bytes(tmp_path, name) for name in BEHAVIOUR}
    srv = Server(tmp_path, files)
    yield srv
    srv.close()


def flaky_pipe(tmp: Path) -> tuple[str, Path]:
    """A ``pipe:`` shard whose command writes part of the tar and exits 3 the first time."""
    data = shard_bytes(tmp, "piped")
    cut = cut_points(data, tmp / "piped.tar")[0]
    script = tmp / "flaky.sh"
    script.write_text(
        'n=$(cat "$1" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$1"\n'
        'if [ "$n" -le 1 ]; then head -c "$3" "$2"; exit 3; fi\n'
        'cat "$2"\n'
    )
    counter = tmp / "piped.count"
    return f"pipe:sh {script} {counter} {tmp / 'piped.tar'} {cut}", counter


def data_cfg(tmp: Path, **kw: object) -> DataConfig:
    base = dict(root=str(tmp), tokenizer="", num_workers=0, shuffle_buffer=4, shards_per_chunk=2,
                shard_retries=RETRIES, shard_retry_backoff_s=0.01, max_skip_rate=1.0)  # fmt: skip
    base.update(kw)
    return DataConfig(**base)


def test_failing_shards_are_retried_then_skipped_and_named(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipe, counter = flaky_pipe(tmp_path)
    spec = "::".join([server.url(n) for n in BEHAVIOUR] + [pipe])
    assert expand_urls(spec, str(tmp_path)) == [server.url(n) for n in BEHAVIOUR] + [pipe]  # unchecked
    data = data_cfg(tmp_path, max_failed_shards=2)  # exactly the 2 that keep failing: not past it
    ev = EvalLoader(spec, ["image"], INP, data, batch_size=3, rank=0, world_size=1)
    with caplog.at_level(logging.INFO, logger="mico_ds.data.remote"):
        keys = [k for b in ev for k in b[schema.KEYS]]

    # Everything but the shards that kept failing, each sample once; of the always-dropped shard the
    # two samples complete before the cut (read on every attempt, handed on once).
    want = [f"{n}_{i}" for n in ["ok0", "ok1", "flaky", "boundary", "piped"] for i in range(SAMPLES)]
    want += ["dropped_0", "dropped_1"]
    assert sorted(keys) == sorted(want) and len(keys) == len(set(keys))
    assert server.requests == {"ok0": 1, "ok1": 1, "flaky": 3, "boundary": 2, "err500": 1 + RETRIES,
                               "dropped": 1 + RETRIES}  # fmt: skip
    assert counter.read_text().strip() == "2"  # the pipe command ran twice
    st = ev.skip_stats()
    assert st["skipped"] == {SHARD_FAILED: 2} and st["seen"] == len(want) + 2
    examples = " ".join(st["examples"][SHARD_FAILED])
    assert server.url("err500") in examples and "HTTP Error 500" in examples
    assert server.url("dropped") in examples and "connection closed after" in examples
    failed = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failed) == 2
    assert any(server.url("err500") in m and f"{1 + RETRIES} attempts" in m for m in failed)
    assert any(server.url("dropped") in m for m in failed)
    retried = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    for name in ("flaky", "boundary"):
        assert f"shard {server.url(name)}: read completely on attempt" in retried
    assert f"shard {pipe}: read completely on attempt 2" in retried


def test_past_max_failed_shards_the_loader_stops_naming_them(server: Server, tmp_path: Path) -> None:
    names = ["ok0", "err500", "ok1", "dropped"]
    corpus = CorpusConfig(name="web", shards="::".join(server.url(n) for n in names), modalities=["image"],
                          batch_size=2)  # fmt: skip
    # 0.25 of the stream's 4 shards per epoch = 1 failed shard allowed; the second stops the run.
    loader = CorpusLoader(corpus, INP, data_cfg(tmp_path, max_failed_shards=0.25), seed=0, rank=0,
                          world_size=1, num_workers=1)  # fmt: skip
    with pytest.raises(ValueError) as e:
        for _ in range(10):
            next(loader)
    msg = str(e.value)
    assert "'web'" in msg and "data.max_failed_shards=0.25" in msg and "2 shards failed in epoch 0" in msg
    assert server.url("err500") in msg and server.url("dropped") in msg
    assert server.url("ok0") not in msg


def test_local_shards_are_read_once_and_backoff_doubles(tmp_path: Path) -> None:
    path = tmp_path / "local.tar"
    write_tar(path, [("a", {"txt": b"x"})])
    path.write_bytes(path.read_bytes()[:700])  # truncated inside the member data
    calls = []

    def read(url: str) -> Iterator[dict]:
        calls.append(url)
        return iter_tar(url)

    items = list(iter_with_retries(str(path), read, retries=3, backoff=0.01, sleep=lambda s: None))
    assert calls == [str(path)] and [it["__error__"] for it in items] == ["truncated_tar"]
    assert [backoff_s(a, 1.0) for a in (1, 2, 3, 8)] == [1.0, 2.0, 4.0, 60.0]
