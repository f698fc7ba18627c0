"""CheckpointManager in one process with a stand-in engine: the manifest a save records, a save that
runs out of space (latest kept, partial files removed, the space needed named), the up-front free-space
check, and a resume that falls back from a damaged checkpoint. The 2-rank versions on a real full
file system: tests/integration/test_checkpoint_faults.py."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import torch

from mico_ds import checkpoint as ckpt
from mico_ds.checkpoint import manifest, saving
from mico_ds.config import load_config, to_dict

CONFIG = to_dict(load_config("debug"))
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class TorchCheckpointEngine:
    """Named as DeepSpeed's: the manager writes its files itself, hashing them."""

    zipfile_serialization = True

    def save(self, state_dict, path: str) -> None:
        torch.save(state_dict, path)


class Engine:
    """What CheckpointManager uses of a DeepSpeed engine when saving."""

    def __init__(self) -> None:
        self.checkpoint_engine = TorchCheckpointEngine()

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save(
            {"module": torch.arange(500.0), **client_state}, str(d / "model_states.pt")
        )
        self.checkpoint_engine.save({"exp_avg": torch.ones(20_000)}, str(d / OPTIM))
        self._copy_recovery_script(save_dir)

    def _copy_recovery_script(self, save_path: str) -> None:
        (Path(save_path) / "zero_to_fp32.py").write_text("# DeepSpeed's script\n")


class Data:
    def __init__(self) -> None:
        self.state = {"pos": 0}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, s: dict) -> None:
        self.state = dict(s)

    def fast_forward(self, step: int) -> None:
        self.state = {"pos": step}


def manager(run: Path) -> ckpt.CheckpointManager:
    return ckpt.CheckpointManager(run, Engine(), Data(), keep_last=3, keep_every=0)


def meta(**checkpoint) -> dict:
    return {"config": {**CONFIG, "checkpoint": {**CONFIG["checkpoint"], **checkpoint}}, "history": []}


def test_a_save_records_every_file_in_the_manifest(tmp_path: Path) -> None:
    m = manager(tmp_path)
    tag_dir = m.save(1, meta())
    man = manifest.read(tag_dir)
    assert sorted(man["files"]) == ["client/meta.json", "client/rank0.pt", "model_states.pt", OPTIM]
    for name, rec in man["files"].items():
        size, crc = manifest.checksum_file(tag_dir / name)
        assert (rec["size"], rec["crc32"]) == (size, manifest.crc_hex(crc)), name
    assert manifest.unlisted(tag_dir, man) == []
    assert "save" not in vars(m.engine.checkpoint_engine), "the write hook is removed after the save"
    assert "_copy_recovery_script" not in vars(m.engine)


def enospc_after(monkeypatch, budget: int) -> None:
    """Every file opened for writing by the manifest's writer takes from one budget of bytes."""
    left = [budget]
    real_open = open

    class Full:
        def __init__(self, path: str) -> None:
            self.f = real_open(path, "wb")

        def write(self, b) -> int:
            n = memoryview(b).nbytes
            if n > left[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            left[0] -= n
            return self.f.write(b)

        def flush(self) -> None:
            self.f.flush()

        def close(self) -> None:
            self.f.close()

    monkeypatch.setattr(manifest, "open", lambda p, mode: Full(p), raising=False)


def test_a_full_disk_keeps_latest_removes_the_partial_files_and_says_how_much_is_needed(
    tmp_path: Path, monkeypatch
) -> None:
    m = manager(tmp_path)
    first = m.save(1, meta())
    size = saving.checkpoint_size(first)
    enospc_after(monkeypatch, 10_000)  # the model states fit, the optimizer states do not
    with pytest.raises(ckpt.CheckpointSaveError) as e:
        m.save(2, meta(check_free_space=False))
    msg = str(e.value)
    assert "\n" not in msg, "one line: the failure report shows the first line"
    assert f"could not be saved in {tmp_path / 'checkpoints'}" in msg
    assert "disk full: [Errno 28] No space left on device" in msg and f"{OPTIM} (after " in msg
    assert f"The checkpoint needs {saving.fmt_bytes(size)}" in msg or f"({size} bytes)" in msg
    assert "`latest` still names step00000001" in msg and "--resume latest" in msg
    assert m.latest() == "step00000001" and not (tmp_path / "checkpoints" / "step00000002").exists()
    assert "save" not in vars(m.engine.checkpoint_engine)


def test_the_space_needed_is_the_whole_checkpoint_when_the_first_save_fails(
    tmp_path: Path, monkeypatch
) -> None:
    ok = manager(tmp_path / "ok").save(1, meta())
    enospc_after(monkeypatch, 1000)
    with pytest.raises(ckpt.CheckpointSaveError, match="no checkpoint had been committed before") as e:
        manager(tmp_path / "full").save(1, meta())
    # every file was still serialized (not written) to count its bytes: the need is exact
    assert f"({saving.checkpoint_size(ok)} bytes)" in str(e.value)
    assert ckpt.list_tags(tmp_path / "full" / "checkpoints") == []


def test_the_up_front_check_refuses_a_save_that_cannot_fit(tmp_path: Path, monkeypatch) -> None:
    m = manager(tmp_path)
    size = saving.checkpoint_size(m.save(1, meta()))
    monkeypatch.setattr("mico_ds.checkpoint.manager.free_bytes", lambda p: size - 1)
    with pytest.raises(ckpt.CheckpointSaveError, match="would not fit") as e:
        m.save(2, meta())
    assert f"({size} bytes, the size of step00000001)" in str(e.value) and "nothing was written" in str(
        e.value
    )
    assert not (tmp_path / "checkpoints" / "step00000002").exists()
    m.save(2, meta(check_free_space=False))  # the check is a setting
    assert m.latest() == "step00000002"


def test_a_leftover_directory_of_the_step_is_replaced(tmp_path: Path) -> None:
    m = manager(tmp_path)
    stale = tmp_path / "checkpoints" / "step00000003"
    (stale / "client").mkdir(parents=True)
    (stale / "zero_pp_rank_7_mp_rank_00_optim_states.pt").write_bytes(b"from a crashed save")
    m.save(3, meta())
    assert not (stale / "zero_pp_rank_7_mp_rank_00_optim_states.pt").exists()
    assert manifest.check(stale)[1] == []


@pytest.fixture
def two_saves(tmp_path: Path, monkeypatch) -> ckpt.CheckpointManager:
    loaded: list[str] = []
    monkeypatch.setattr(
        "mico_ds.distributed.zero_checkpoint.load_engine_checkpoint",
        lambda engine, ckpt_dir, tag, universal=False: loaded.append(tag) or str(ckpt_dir / tag),
    )
    m = manager(tmp_path)
    m.data.state = {"pos": 1}
    m.save(1, meta())
    m.data.state = {"pos": 2}
    m.save(2, meta())
    m.loaded = loaded  # type: ignore[attr-defined]
    return m


def test_resume_latest_falls_back_to_the_newest_intact_checkpoint(two_saves, caplog) -> None:
    m = two_saves
    bad = m.ckpt_dir / "step00000002" / OPTIM
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(data)
    with caplog.at_level(logging.INFO, logger="mico_ds"):
        r = m.load("latest", CONFIG, allow_config_change=False)
    assert r.step == 1 and m.loaded == ["step00000001"] and m.data.state == {"pos": 1}
    assert f"{OPTIM}: checksum mismatch" in caplog.text and "not resuming from it" in caplog.text
    assert "the newest intact checkpoint (`latest` names step00000002)" in caplog.text
    assert "verified 4 files" in caplog.text
    assert m.latest() == "step00000001", "latest names the intact checkpoint; the damaged one is newer"
    with pytest.raises(ValueError, match=f"step00000002 is damaged: {OPTIM}: checksum mismatch"):
        m.load("step00000002", CONFIG, allow_config_change=False)
    # verification off: the damaged checkpoint loads (torch.load cannot tell a flipped bit)
    off = {**CONFIG, "checkpoint": {**CONFIG["checkpoint"], "verify": "off"}}
    assert m.load("step00000002", off, allow_config_change=False).step == 2


def test_a_truncated_latest_and_no_intact_checkpoint_at_all(two_saves) -> None:
    m = two_saves
    for tag in ("step00000002", "step00000001"):
        f = m.ckpt_dir / tag / "client" / "rank0.pt"
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(
        ValueError, match="no intact checkpoint in .*step00000002: client/rank0.pt: wrong size"
    ):
        m.load("latest", CONFIG, allow_config_change=False)
    cfg = {**CONFIG, "checkpoint": {**CONFIG["checkpoint"], "verify": "size"}}
    with pytest.raises(ValueError, match="wrong size"):
        m.load("step00000001", cfg, allow_config_change=False)


def test_a_checkpoint_without_a_manifest_loads_unverified(two_saves, caplog) -> None:
    m = two_saves
    (m.ckpt_dir / "step00000002" / ckpt.MANIFEST_FILE).unlink()
    with caplog.at_level(logging.INFO, logger="mico_ds"):
        assert m.load("latest", CONFIG, allow_config_change=False).step == 2
    assert "not verified: no mico_manifest.json" in caplog.text
