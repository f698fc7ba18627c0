"""Fuzzing the sample decoders with hypothesis: real members of every modality and whole shard tars
(``mico_ds.data.fuzz``), mutated (byte flips, truncations, insertions, oversized header fields); each
input decodes to the declared shapes or is a SkipSample, never anything else, and no input raises this
process's peak memory by more than MEMORY_BOUND.

Bounded for CI: the hypothesis profile ``ci`` (the default) tries MICO_FUZZ_EXAMPLES (default 150)
inputs per kind, derandomized; ``MICO_FUZZ_PROFILE=long`` draws new inputs each run (default 1000 per
kind). For hours, use tools/fuzz_decoders.py (docs/operations.md, "Bounded decoding and fuzzing").
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mico_ds import memory
from mico_ds.cli.fuzz_decoders import main as fuzz_main
from mico_ds.config import DecodeLimits
from mico_ds.data import fuzz
from mico_ds.data.fuzz_mutate import OPS, apply_ops

_N = os.environ.get("MICO_FUZZ_EXAMPLES")
settings.register_profile(
    "ci", max_examples=int(_N or 150), derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
settings.register_profile(
    "long", max_examples=int(_N or 1000), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
PROFILE = os.environ.get("MICO_FUZZ_PROFILE", "ci")

# Caps well under the defaults keep every input fast on two cores; what is checked is that a claim
# over a cap is refused before it is allocated, whatever the cap.
LIMITS = DecodeLimits(member_bytes=4 << 20, image_pixels=4_000_000, video_frames=600,
                      video_pixels=4_000_000, audio_seconds=60.0, json_bytes=64 << 10)  # fmt: skip
MEMORY_BOUND = 256 << 20  # peak resident growth of one input (pixels, frames, samples at the caps)

OPS_STRATEGY = st.lists(
    st.tuples(st.sampled_from(OPS), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1)), min_size=1, max_size=4
)
MEMBER_KINDS = [k for k in fuzz.seeds() if k != fuzz.SHARD]
CAN_MEASURE = fuzz._can_reset_peak()


def decode_within_memory(kind: str, ops: list, train: bool) -> list[str]:
    before = memory.proc_status(("VmRSS",)).get("VmRSS", 0)
    if CAN_MEASURE:
        memory.reset_peak_rss()
    reasons = fuzz.decode_mutated(kind, ops, train, LIMITS)  # raises on a crash: the test fails
    if CAN_MEASURE:
        growth = memory.proc_status(("VmHWM",))["VmHWM"] - before
        assert growth < MEMORY_BOUND, f"{kind} {ops}: peak memory grew {growth >> 20} MiB"
    return reasons


@pytest.mark.parametrize("kind", MEMBER_KINDS)
@settings(settings.get_profile(PROFILE))
@given(ops=OPS_STRATEGY, train=st.booleans())
def test_mutated_member_decodes_or_is_skipped(kind: str, ops: list, train: bool) -> None:
    decode_within_memory(kind, ops, train)


@settings(settings.get_profile(PROFILE))
@given(ops=OPS_STRATEGY, train=st.booleans())
def test_mutated_shard_streams_or_is_skipped(ops: list, train: bool) -> None:
    decode_within_memory(fuzz.SHARD, ops, train)


@pytest.mark.parametrize("kind", list(fuzz.seeds()))
def test_seeds_decode_unmutated(kind: str) -> None:
    assert fuzz.decode_mutated(kind, [], train=False, limits=LIMITS) == []


@pytest.mark.parametrize(
    "kind,ops,reason",
    [("image_png", [("header", 0 / 64, 2)], "too_many_pixels"),  # IHDR: 60,000 x 60,000
     ("depth_npy", [("header", 1 / 64, 2)], "too_many_pixels"),  # shape (60000, 60000)
     ("audio_flac", [("header", 1 / 64, 18)], "too_long_audio"),  # STREAMINFO: 2^36 - 1 samples
     ("video_mp4", [("header", 7 / 64, 3)], "too_many_frames")],  # stts: 2^32 - 1 frames
)  # fmt: skip
def test_oversized_header_fields_are_refused_before_decoding(kind: str, ops: list, reason: str) -> None:
    assert apply_ops(fuzz.seeds()[kind].data, ops) != fuzz.seeds()[kind].data
    assert decode_within_memory(kind, ops, False) == [reason]


def test_the_tool_reports_inputs_skips_crashes_and_memory(tmp_path, capsys) -> None:
    out = tmp_path / "fuzz.json"
    assert fuzz_main(["--examples", str(2 * len(fuzz.seeds())), "--seconds", "60", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["inputs_tried"] == 2 * len(fuzz.seeds()) and set(report["inputs"]) == set(fuzz.seeds())
    assert report["crashes"] == 0 and report["peak_rss_mib"] > 0
    assert "inputs tried" in capsys.readouterr().out
