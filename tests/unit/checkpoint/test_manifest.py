"""The checkpoint manifest (mico_ds.checkpoint.manifest): sizes and CRC-32s recorded while writing,
and what verification reports for a truncated, bit-flipped, missing or extra file."""

from __future__ import annotations

import errno
import json
import zlib
from pathlib import Path

import pytest
import torch

from mico_ds.checkpoint import manifest
from mico_ds.checkpoint.layout import MANIFEST_FILE


class WriteOnly:
    """A sink with nothing but ``write`` and ``flush``: torch.save must not seek, tell or read."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b) -> int:
        self.data += bytes(b)
        return len(b)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("zipfile", [True, False])
def test_torch_save_needs_only_write(zipfile: bool, tmp_path: Path) -> None:
    sd = {"a": torch.randn(300, 7), "b": [1, {"c": torch.arange(5)}]}
    sink = WriteOnly()
    torch.save(sd, sink, _use_new_zipfile_serialization=zipfile)
    w = manifest.HashingWriter(tmp_path / "x.pt")
    torch.save(sd, w, _use_new_zipfile_serialization=zipfile)
    w.close()
    data = (tmp_path / "x.pt").read_bytes()
    assert bytes(sink.data) == data and w.size == len(data) == w.written
    assert manifest.crc_hex(w.crc) == manifest.crc_hex(zlib.crc32(data))
    assert manifest.checksum_file(tmp_path / "x.pt") == (len(data), zlib.crc32(data))
    assert torch.equal(torch.load(tmp_path / "x.pt")["a"], sd["a"])


class FullAfter:
    """A file that takes ``budget`` bytes, then raises ENOSPC (what a full disk does)."""

    def __init__(self, path: Path, budget: int) -> None:
        self.f, self.left = open(path, "wb"), budget  # noqa: SIM115

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if n > self.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= n
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def test_a_failed_write_removes_the_file_and_counts_the_whole_size(tmp_path: Path, monkeypatch) -> None:
    sd = {"a": torch.randn(1000), "b": torch.randn(1000)}
    full = manifest.HashingWriter(tmp_path / "ok.pt")
    torch.save(sd, full)
    full.close()
    monkeypatch.setattr(manifest, "open", lambda p, mode: FullAfter(Path(p), 3000), raising=False)
    w = manifest.HashingWriter(tmp_path / "x.pt")
    torch.save(sd, w)  # does not raise: the writer remembers the error and keeps counting
    w.close()
    assert isinstance(w.error, OSError) and w.error.errno == errno.ENOSPC
    assert not (tmp_path / "x.pt").exists(), "the partial file is removed"
    assert w.size == full.size and 0 < w.written <= 3000


def write_checkpoint(tag_dir: Path) -> dict:
    files = {}
    for i, name in enumerate(
        ["zero_pp_rank_0_optim_states.pt", "zero_pp_rank_1_optim_states.pt", "client/rank0.pt"]
    ):
        (tag_dir / name).parent.mkdir(parents=True, exist_ok=True)
        w = manifest.HashingWriter(tag_dir / name)
        torch.save({"t": torch.full((2000 * (i + 1),), float(i))}, w)
        w.close()
        files[name] = w.record(rank=i % 2)
    m = manifest.build(tag_dir.name, files)
    manifest.write(tag_dir, m)
    return m


def test_an_intact_checkpoint_verifies_and_the_format_is_documented(tmp_path: Path) -> None:
    tag_dir = tmp_path / "step00000004"
    m = write_checkpoint(tag_dir)
    on_disk = json.loads((tag_dir / MANIFEST_FILE).read_text())
    assert on_disk == m and on_disk["format"] == 1 and on_disk["algorithm"] == "crc32"
    rec = on_disk["files"]["client/rank0.pt"]
    assert (
        set(rec) == {"size", "crc32", "rank"} and rec["size"] == (tag_dir / "client/rank0.pt").stat().st_size
    )
    assert manifest.read(tag_dir) == m
    assert manifest.check(tag_dir) == (m, [])
    assert "verified 3 files" in manifest.require_intact(tag_dir)


def flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x04
    path.write_bytes(data)


def test_truncated_flipped_and_missing_files_are_named(tmp_path: Path) -> None:
    tag_dir = tmp_path / "step00000004"
    m = write_checkpoint(tag_dir)
    a, b, c = sorted(m["files"])  # client/rank0.pt, zero_pp_rank_0..., zero_pp_rank_1...
    flip(tag_dir / b)
    (tag_dir / c).write_bytes((tag_dir / c).read_bytes()[:-100])
    (tag_dir / a).unlink()
    _, problems = manifest.check(tag_dir)
    assert [(p.file, p.kind) for p in problems] == [(a, "missing"), (b, "checksum"), (c, "size")]
    text = "; ".join(map(str, problems))
    assert f"{b}: checksum mismatch (CRC-32 " in text and f"{c}: wrong size (" in text
    assert "the manifest records" in text and f"{a}: missing (written by rank 0)" in text
    # sizes only: the flipped file passes, the truncated one does not
    assert [p.file for p in manifest.check(tag_dir, checksums=False)[1]] == [a, c]
    with pytest.raises(ValueError, match="--no-verify"):
        manifest.require_intact(tag_dir)


def test_extra_files_are_reported_not_errors(tmp_path: Path) -> None:
    tag_dir = tmp_path / "step00000004"
    m = write_checkpoint(tag_dir)
    (tag_dir / "NOTES.txt").write_text("copied from cluster A")
    assert manifest.check(tag_dir)[1] == []
    assert manifest.unlisted(tag_dir, m) == ["NOTES.txt"]


def test_a_damaged_manifest_is_found_by_its_digest(tmp_path: Path) -> None:
    tag_dir = tmp_path / "step00000004"
    write_checkpoint(tag_dir)
    f = tag_dir / MANIFEST_FILE
    m = json.loads(f.read_text())
    m["files"]["client/rank0.pt"]["size"] += 1  # the list changed, the digest did not
    f.write_text(json.dumps(m))
    with pytest.raises(manifest.ManifestError, match="digest does not match"):
        manifest.read(tag_dir)
    f.write_text(f.read_text()[:50])
    assert [p.kind for p in manifest.check(tag_dir)[1]] == ["manifest"]
    f.unlink()
    assert manifest.check(tag_dir) == (None, [])  # no manifest: not verified, not damaged
    assert "not verified" in manifest.require_intact(tag_dir)


def test_shares_are_balanced_by_bytes_and_cover_every_file_once() -> None:
    files = {f"f{i}": {"size": s} for i, s in enumerate([100, 90, 10, 10, 10, 5, 1])}
    m = {"files": files}
    parts = manifest.shares(m, 3)
    assert sorted(n for p in parts for n in p) == sorted(files)
    loads = [sum(files[n]["size"] for n in p) for p in parts]
    assert max(loads) == 100 and min(loads) >= 26
    assert manifest.shares(m, 3) == parts, "the same split on every rank"


def test_the_command_line_check(tmp_path: Path, capsys) -> None:
    from mico_ds.checkpoint.__main__ import main

    ck = tmp_path / "run" / "checkpoints"
    write_checkpoint(ck / "step00000004")
    (ck / "latest").write_text("step00000004")
    assert main([str(tmp_path / "run")]) == 0
    assert "verified 3 files of" in capsys.readouterr().out
    (ck / "step00000004" / "client" / "rank0.pt").unlink()
    assert main([str(ck), "--tag", "step00000004", "--size-only"]) == 2
    err = capsys.readouterr().err
    assert "client/rank0.pt: missing" in err and "--no-verify" not in err
