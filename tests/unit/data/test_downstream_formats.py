"""tools/make_shards.py --format F for the downstream datasets (docs/data.md, "Downstream datasets"):
each dataset's published annotation layout, written here with real media (JPEG/PNG, H.264/AAC MP4,
MPEG-4 AVI, GIF, WAV/FLAC), becomes shards whose captions lists, qa pairs and labels are complete and
which the project's decoder and evaluation loader read; a missing and an undecodable file are skipped
and named (FILE:LINE: key: kind), and more skips than --max-skip fail the run."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from mico_ds.cli import make_shards
from mico_ds.config import DataConfig
from mico_ds.data import schema
from mico_ds.data.read.batch import eval_extras
from mico_ds.data.read.loader import EvalLoader
from mico_ds.data.write import media
from mico_ds.data.write.ingest import STATE_FILE
from tests.unit.data.test_ingest_formats import FPS, INPUTS, decode, probe, report, shards, video

GARBAGE = b"this is not a media file\n" * 4
BAD3 = {"missing_file": 1, "unreadable": 1, "bad_entry": 1}  # a missing file, an undecodable one, a bad entry


def jpeg(level: int) -> bytes:
    return media.encode_jpeg(np.full((16, 24, 3), level, np.uint8))


def png(level: int) -> bytes:
    return media.encode_png(np.full((16, 24, 3), level, np.uint8))


def wav(seconds: float, sr: int = 8000, fmt: str = "WAV", seed: int = 0) -> bytes:
    """16-bit mono noise (distinct samples, so a cut's position can be checked)."""
    wave = np.random.default_rng(seed).integers(-8000, 8000, int(seconds * sr), dtype=np.int16)
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def avi(seconds: float) -> bytes:
    """MPEG-4 Part 2 in AVI, as MSVD's YouTubeClips are (no sound)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as c:
        vs = c.add_stream("mpeg4", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        for i in range(int(seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 9 * i, np.uint8), format="rgb24")
            frame.pts = i
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def json_lines(entries: list, member: str | None = None, head: dict | None = None) -> str:
    """A JSON list (or ``{**head, member: [...]}``) with one entry a line: entry i on line i + 2."""
    body = "[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]"
    if member is None:
        return body
    before = "".join(f"{json.dumps(k)}: {json.dumps(v)}, " for k, v in (head or {}).items())
    return "{" + before + json.dumps(member) + ": " + body + "}"


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def argv(fmt: str, ann: list[Path], out: Path, root: Path | None, *extra: str) -> list[str]:
    """``tools/make_shards.py --format fmt ...`` arguments (one worker, two samples a shard)."""
    files = ["--annotations", *map(str, ann)] if ann else []
    media_root = ["--media-root", str(root)] if root else []
    return ["--format", fmt, *files, *media_root, "--out", str(out), "--samples-per-shard", "2",
            "--workers", "1", "--quiet", *extra]  # fmt: skip


def make(
    fmt: str, ann: list[Path], out: Path, root: Path | None, *extra: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, int]]:
    """The CLI (in this process) with --max-skip 0, which the skips fail (exit 1, shards kept), then
    with --max-skip 1.0, which accepts the finished run; (records, skip kinds) of OUT/ingest.json."""
    args = argv(fmt, ann, out, root, *extra)
    capsys.readouterr()
    assert make_shards.main([*args, "--max-skip", "0"]) == 1
    assert "records skipped" in capsys.readouterr().err
    assert make_shards.main([*args, "--max-skip", "1.0"]) == 0
    assert "already complete" in capsys.readouterr().out
    state = json.loads((out / STATE_FILE).read_text())
    assert state["complete"]
    return state["consumed"], state["skip_kinds"]


def skips(out: Path, where: Path) -> dict[str, str]:
    """``LINE ...: key`` -> ``kind: detail`` of OUT/skipped.txt, whose every line names ``where`` (the
    annotation file, or the media root of a folder format) first."""
    found = {}
    for line in report(out):
        assert line.startswith(f"{where}:") or line.startswith(f"{where}/"), line
        place, key, rest = line[len(str(where)) + 1 :].split(": ", 2)
        found[f"{place}: {key}"] = rest
    return found


def meta(sample: dict[str, bytes]) -> dict:
    return json.loads(sample["json"])


def eval_batch(out: Path, modalities: list[str], **data: object) -> dict:
    """The one batch of the project's evaluation loader over OUT's shards."""
    cfg = DataConfig(root=str(out), tokenizer="", text_max_len=32, num_workers=0, **data)
    loader = EvalLoader("*.tar", modalities, INPUTS, cfg, batch_size=64, tokenizer=None, rank=0, world_size=1)
    (batch,) = list(loader)
    return batch


# ----------------------------------------------------------------------------- COCO / Flickr30k Karpathy


def test_coco_karpathy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "coco"
    write(root / "val2014" / "COCO_val2014_000000000001.jpg", jpeg(10))
    write(root / "val2014" / "COCO_val2014_000000000005.jpg", GARBAGE)
    write(root / "train2014" / "COCO_train2014_000000000002.jpg", jpeg(20))
    write(root / "val2014" / "COCO_val2014_000000000003.jpg", png(30))  # a PNG under a .jpg name

    def img(n: int, split: str, folder: str = "val2014", sentences: object = None) -> dict:
        name = f"COCO_{folder}_{n:012d}.jpg"
        sents = [{"tokens": ["a"], "raw": f"image {n} caption {j} ", "imgid": n, "sentid": 10 * n + j}
                 for j in range(5)] if sentences is None else sentences  # fmt: skip
        return {"filepath": folder, "sentids": [], "filename": name, "imgid": n, "split": split,
                "sentences": sents, "cocoid": n}  # fmt: skip

    images = [img(1, "test"), img(2, "train", "train2014"), img(3, "restval"), img(4, "test"),  # 4: missing
              img(5, "test"), img(6, "test", sentences=[{"raw": 5}]), img(7, "val")]  # fmt: skip
    ann = write(tmp_path / "dataset_coco.json", json_lines(images, "images") + "\n")
    out = tmp_path / "test"
    assert make("coco-karpathy", [ann], out, root, "--split", "test", capsys=capsys) == (4, BAD3)
    samples = shards(out)
    assert list(samples) == ["COCO_val2014_000000000001"]
    s = samples["COCO_val2014_000000000001"]
    assert s["jpg"] == (root / "val2014" / "COCO_val2014_000000000001.jpg").read_bytes()
    assert meta(s) == {"captions": {"vision": [f"image 1 caption {j}" for j in range(5)]}, "cocoid": 1,
                       "imgid": 1, "source": "coco", "split": "test"}  # fmt: skip
    skipped = skips(out, ann)
    missing = skipped["5 (entry 3): COCO_val2014_000000000004"]
    assert missing == f"missing_file: image not found: {root}/val2014/COCO_val2014_000000000004.jpg, " \
                      f"{root}/COCO_val2014_000000000004.jpg"  # fmt: skip
    assert skipped["6 (entry 4): COCO_val2014_000000000005"].startswith(
        "unreadable: COCO_val2014_000000000005.jpg: UnidentifiedImageError"
    )
    assert skipped["7 (entry 5): COCO_val2014_000000000006"].startswith(
        "bad_entry: sentences[0].raw must be a string"
    )
    batch = eval_batch(out, ["image"])  # evaluation: every caption is a reference
    assert batch[schema.EVAL_TEXTS] == [[f"image 1 caption {j}" for j in range(5)]]
    assert tuple(batch["image"].shape) == (1, 3, 32, 32)

    train = tmp_path / "train"  # --split train takes restval too
    assert make_shards.main(argv("coco-karpathy", [ann], train, root, "--split", "train")) == 0
    got = shards(train)
    assert list(got) == ["COCO_train2014_000000000002", "COCO_val2014_000000000003"]
    assert set(got["COCO_val2014_000000000003"]) == {"png", "json"}  # the content decides the member
    assert [meta(m)["split"] for m in got.values()] == ["train", "restval"]

    flickr_root = tmp_path / "flickr30k-images"  # Flickr30k: no filepath, no cocoid
    write(flickr_root / "1000092795.jpg", jpeg(40))
    raw = ["Two young guys.", "Two men."]
    entry = {"sentids": [0, 1], "imgid": 0, "sentences": [{"raw": r} for r in raw], "split": "train",
             "filename": "1000092795.jpg"}  # fmt: skip
    flickr = write(tmp_path / "dataset_flickr30k.json", json.dumps({"images": [entry], "dataset": "flickr"}))
    assert make_shards.main(argv("coco-karpathy", [flickr], tmp_path / "f", flickr_root)) == 0
    ((key, sample),) = shards(tmp_path / "f").items()
    want = {"captions": {"vision": raw}, "imgid": 0, "source": "flickr30k", "split": "train"}  # the file name
    assert (key, meta(sample)) == ("1000092795", want)


# ----------------------------------------------------------------------------- MSR-VTT


def test_msrvtt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "MSRVTT" / "videos" / "all"
    write(root / "video0.mp4", video(1.0))
    write(root / "TestVideo" / "video2.mp4", video(1.0, sound=False))  # the test zip's folder
    write(root / "video3.mp4", GARBAGE)
    url = "https://www.youtube.com/watch?v=9lZi22qLlEo"
    splits = ["train", "validate", "test", "train", "train", "train"]
    videos = [{"category": 9, "url": url, "video_id": f"video{i}", "start time": 137.72, "end time": 149.44,
               "split": split, "id": i} for i, split in enumerate(splits)]  # fmt: skip
    sentences = [{"caption": f"video0 sentence {j}", "video_id": "video0", "sen_id": j} for j in range(20)]
    sentences += [{"caption": f"video{i} sentence", "video_id": f"video{i}", "sen_id": 20 + i}
                  for i in (1, 2, 3, 5)]  # fmt: skip
    sentences += [{"caption": 7, "video_id": "video0", "sen_id": 99}]  # malformed
    doc = ('{"info": {"year": 2016}, "videos": ' + json_lines(videos) + ', "sentences": '
           + json_lines(sentences) + "}\n")  # fmt: skip
    ann = write(tmp_path / "train_val_videodatainfo.json", doc)
    out = tmp_path / "out"
    # train: video0, video3 (undecodable), video4 (no sentence), video5 (no file), the bad sentence
    got = make("msrvtt", [ann], out, root, "--split", "train", capsys=capsys)
    assert got == (5, {**BAD3, "bad_entry": 2})
    samples = shards(out)
    assert list(samples) == ["video0"]
    m = meta(samples["video0"])
    assert m["captions"] == {"vision": [f"video0 sentence {j}" for j in range(20)]}
    assert (m["video_id"], m["split"], m["category"], m["source"]) == ("video0", "train", 9, "msrvtt")
    assert samples["video0"]["mp4"] == (root / "video0.mp4").read_bytes()
    skipped = skips(out, ann)
    line = 1 + len(videos) + 1 + 24 + 1  # after the first line, the videos, '], "sentences": [', 24 sentences
    assert skipped[f"{line} (entry 24): video0"].startswith("bad_entry: sentence caption must be")
    assert skipped["5 (entry 3): video3"].startswith("unreadable: ")
    assert skipped["6 (entry 4): video4"] == "bad_entry: no sentence of video4 in " + ann.name
    assert skipped["7 (entry 5): video5"].startswith(f"missing_file: video not found: {root}/video5.")
    got = decode(samples["video0"], "video0", ["video", "audio"])
    assert tuple(got["video"].shape) == (2, 3, 32, 32) and got["fields"]["vision"] == "video0 sentence 0"
    assert len(eval_batch(out, ["video"])[schema.EVAL_TEXTS][0]) == 20

    everything = tmp_path / "all"
    assert make_shards.main(argv("msrvtt", [ann], everything, root, "--max-skip", "1.0")) == 0
    assert list(shards(everything)) == ["video0", "video2"]  # video1 (validate) has no file
    assert [n.split(": ", 2)[1:] for n in report(everything, "notes.txt")] == [
        ["video2", "no audio stream: kept as a video-only sample"]]  # fmt: skip


# ----------------------------------------------------------------------------- AudioCaps


def test_audiocaps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "audiocaps_audio"
    long_wav = write(root / "abcdefghijk.wav", wav(12.0))  # a whole recording: cut to [1, 11) s
    write(root / "Bcutclip000_30.flac", wav(10.0, fmt="FLAC", seed=1))  # an already-cut clip
    write(root / "103.wav", wav(10.0, seed=2))  # a clip named by its audiocap_id
    write(root / "shortclip01.wav", wav(2.0, seed=3))  # <youtube_id>.wav that is the 10 s clip already
    write(root / "undecodable_0.wav", GARBAGE)
    write(root / "pastend0000.wav", wav(12.0, seed=4))
    rows = [["audiocap_id", "youtube_id", "start_time", "caption"]]
    rows += [[str(90 + j), "abcdefghijk", "1", f"a dog barks, {j}"] for j in range(5)]
    rows += [["101", "Bcutclip000", "30", "rain falls"], ["103", "namedbyid00", "60", "a bell rings"],
             ["104", "shortclip01", "40", "wind blows"], ["105", "missing0000", "0", "a car passes"],
             ["106", "undecodable", "0", "noise"], ["107", "pastend0000", "20", "late"],
             ["108", "badstart000", "soon", "malformed"]]  # fmt: skip
    ann = write_csv(tmp_path / "dataset" / "val.csv", rows)
    out = tmp_path / "out"
    assert make("audiocaps", [ann], out, root, capsys=capsys) == (
        8, {"missing_file": 1, "unreadable": 1, "span_past_end": 1, "bad_entry": 1})  # fmt: skip
    samples = shards(out)
    assert list(samples) == ["abcdefghijk_1", "Bcutclip000_30", "namedbyid00_60", "shortclip01_40"]
    a = samples["abcdefghijk_1"]
    assert meta(a) == {"captions": {"audio": [f"a dog barks, {j}" for j in range(5)]}, "source": "audiocaps",
                       "youtube_id": "abcdefghijk", "start_time": 1, "video_id": "abcdefghijk",
                       "audiocap_ids": [90, 91, 92, 93, 94]}  # fmt: skip
    cut, sr = sf.read(io.BytesIO(a["flac"]), dtype="int16")
    whole, _ = sf.read(long_wav, dtype="int16")
    assert sr == 8000 and len(cut) == 10 * 8000 and np.array_equal(cut, whole[8000:88000])  # [1, 11) s
    assert samples["Bcutclip000_30"]["flac"] == (root / "Bcutclip000_30.flac").read_bytes()
    assert samples["namedbyid00_60"]["wav"] == (root / "103.wav").read_bytes()
    assert samples["shortclip01_40"]["wav"] == (root / "shortclip01.wav").read_bytes()
    note = (
        "shortclip01.wav is 2.000 s long, no longer than the span [40, 50) s: taken as the already-cut clip"
    )
    assert [n.split(": ", 2)[1:] for n in report(out, "notes.txt")] == [["shortclip01_40", note]]
    skipped = skips(out, ann)
    missing = skipped["10: missing0000_0"]
    assert missing.startswith(f"missing_file: audio not found: {root}/missing0000_0.{{wav,flac,")
    assert f"; nor {root}/105.{{wav," in missing and f"; nor {root}/missing0000.{{wav," in missing
    assert skipped["11: undecodable_0"].startswith("unreadable: ")
    assert skipped["12: pastend0000_20"] == (
        "span_past_end: span starts at 20.000 s, past the recording's end (12.000 s)")  # fmt: skip
    assert skipped["13: -"].startswith("bad_entry: youtube_id / start_time: not a timestamp: 'soon'")
    got = decode(a, "k", ["audio"])
    assert got["fields"] == {"audio": "a dog barks, 0"} and got["audio"].shape[-2] == INPUTS.mel_bins


# ----------------------------------------------------------------------------- Clotho


def test_clotho(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "clotho"
    write(root / "development" / "Santa Motor.wav", wav(1.0))  # the parent of the split folders
    write(root / "development" / "broken.wav", GARBAGE)
    caps = [
        "A machine whines and squeals while rhythmically punching or stamping.",
        "A person is using electric clippers to trim bushes.",
        "Someone is trimming the bushes with electric clippers.",
        "The whirring of a pump fills a bladder, turns, it.",
        "While rhythmically punching or stamping.",
    ]
    rows = [["file_name", *(f"caption_{i}" for i in range(1, 6))], ["Santa Motor.wav", *caps],
            ["gone.wav", *caps], ["broken.wav", *caps], ["short.wav", "only", "three", "fields"]]  # fmt: skip
    ann = write_csv(tmp_path / "clotho_captions_development.csv", rows)
    out = tmp_path / "out"
    assert make("clotho", [ann], out, root, capsys=capsys) == (4, BAD3)
    samples = shards(out)
    assert list(samples) == ["Santa_Motor"]
    assert meta(samples["Santa_Motor"]) == {"captions": {"audio": caps}, "file_name": "Santa Motor.wav",
                                            "source": "clotho"}  # fmt: skip
    assert samples["Santa_Motor"]["wav"] == (root / "development" / "Santa Motor.wav").read_bytes()
    skipped = skips(out, ann)
    looked = ", ".join(f"{root}/{d}gone.wav" for d in ("", "development/", "validation/", "evaluation/"))
    assert skipped["3: gone"] == f"missing_file: audio not found: {looked}"
    assert skipped["4: broken"].startswith("unreadable: ")
    assert skipped["5: -"] == "bad_entry: malformed CSV row: 4 fields, the header has 6"
    assert eval_batch(out, ["audio"])[schema.EVAL_TEXTS] == [caps]


# ----------------------------------------------------------------------------- VAST / VALOR downstream


def test_vast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "videos"
    write(root / "video7020.mp4", video(1.0))
    write(root / "silent01.mp4", video(1.0, sound=False))
    write(root / "broken01.mp4", GARBAGE)
    write(root / "COCO_val2014_000000391895.jpg", jpeg(50))
    entries = [
        {"video_id": "video7020", "desc": ["a man talks", "a man speaks"], "subtitle": "hello everyone"},
        {"video_id": "video7020", "question": "what is he doing?", "answer": "talking"},
        {"image_id": "COCO_val2014_000000391895", "caption": "a man rides a motorcycle"},
        {"video_id": "silent01", "desc": "a grey ramp", "question": ["what colour?", "is it dark?"],
         "answer": ["grey", "no"]},
        {"video_id": "missing01", "desc": "gone"},
        {"video_id": "broken01", "desc": "broken"},
        {"video_id": "video7020", "question": ["two", "questions"], "answer": "one answer"},  # malformed
        {"video_id": "video7020", "desc": "a man talks", "question": "who talks?", "answer": "a man"},
    ]  # fmt: skip
    ann = write(tmp_path / "descs_qa_test.json", json_lines(entries))
    out = tmp_path / "out"
    assert make("vast", [ann], out, root, capsys=capsys) == (6, BAD3)
    samples = shards(out)
    assert list(samples) == ["video7020", "COCO_val2014_000000391895", "silent01"]
    qa = [{"q": "what is he doing?", "a": "talking"}, {"q": "who talks?", "a": "a man"}]
    captions = {"omni": ["a man talks", "a man speaks"], "subtitle": "hello everyone"}
    want = {"captions": captions, "source": "vast", "video_id": "video7020", "qa": qa}
    assert meta(samples["video7020"]) == want
    assert meta(samples["COCO_val2014_000000391895"]) == {
        "captions": {"vision": ["a man rides a motorcycle"]}, "image_id": "COCO_val2014_000000391895",
        "source": "vast"}  # fmt: skip
    assert meta(samples["silent01"])["qa"] == [
        {"q": "what colour?", "a": "grey"},
        {"q": "is it dark?", "a": "no"},
    ]
    skipped = skips(out, ann)
    assert skipped["6 (entry 4): missing01"].startswith(f"missing_file: video not found: {root}/missing01.")
    assert skipped["7 (entry 5): broken01"].startswith("unreadable: ")
    assert skipped["8 (entry 6): video7020"].startswith("bad_entry: question and answer must be two")
    assert [n.split(": ", 2)[1:] for n in report(out, "notes.txt")] == [
        ["silent01", "no audio stream: kept as a video-only sample"]]  # fmt: skip
    batch = eval_batch(out, ["video"], val_caption_fields=["omni"])  # the evaluation loader: texts, qa
    assert batch[schema.CAPTIONS] == ["a man talks", "a grey ramp"]
    assert batch[schema.EVAL_TEXTS][0] == ["a man talks", "a man speaks"]
    assert batch[schema.QA][0] == meta(samples["video7020"])["qa"]


# ----------------------------------------------------------------------------- VQA v2


def test_vqa(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "coco"
    write(root / "val2014" / "COCO_val2014_000000000001.jpg", jpeg(60))
    write(root / "000000000002.jpg", jpeg(70))  # COCO 2017's name
    write(root / "COCO_val2014_000000000004.jpg", GARBAGE)
    qs = [
        (1, "What color is the wall?", 10),
        (1, "Is it day?", 11),
        (2, "How many cats?", 20),
        (3, "Where?", 30),
        (4, "Why?", 40),
        (1, "What is on the table?", 12),
        (2, "Is this late?", 21),
    ]
    questions = [{"image_id": i, "question": q, "question_id": qid} for i, q, qid in qs]
    questions.insert(5, {"image_id": "one", "question": "malformed", "question_id": 50})
    head = {"info": {"year": 2017}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
            "data_subtype": "val2014"}  # fmt: skip
    q_file = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    write(q_file, json_lines(questions, "questions", head))
    kinds = {10: ("white", "what color is the", "other"), 11: ("yes", "is it", "yes/no"),
             12: ("cup", "what is on the", "other"), 20: ("2", "how many", "number"),
             30: ("here", "where", "other"), 40: ("because", "why", "other")}  # fmt: skip

    def answers(a: str) -> list[dict]:  # 7 of 10 annotators agree
        return [{"answer": a if k < 7 else f"{a}{k}", "answer_confidence": "yes", "answer_id": k + 1}
                for k in range(10)]  # fmt: skip

    annotations = [{"question_type": qt, "multiple_choice_answer": a, "answers": answers(a),
                    "image_id": qid // 10, "answer_type": at, "question_id": qid}
                   for qid, (a, qt, at) in kinds.items()]  # fmt: skip
    a_head = {"info": {}, "license": {}, "data_subtype": "val2014"}
    a_file = tmp_path / "v2_mscoco_val2014_annotations.json"
    write(a_file, json_lines(annotations, "annotations", a_head))
    out = tmp_path / "out"
    # images 1, 2 kept; 3 missing, 4 undecodable; question 21 has no annotation; one malformed question
    assert make("vqa", [q_file, a_file], out, root, capsys=capsys) == (6, {**BAD3, "bad_entry": 2})
    samples = shards(out)
    assert list(samples) == ["COCO_val2014_000000000001", "COCO_val2014_000000000002"]
    m = meta(samples["COCO_val2014_000000000001"])
    assert (m["image_id"], m["split"], m["source"], m["captions"]) == (1, "val2014", "vqav2", {})
    assert [(p["q"], p["a"], p["question_id"], p["type"]) for p in m["qa"]] == [
        ("What color is the wall?", "white", 10, "other"), ("Is it day?", "yes", 11, "yes/no"),
        ("What is on the table?", "cup", 12, "other")]  # fmt: skip
    assert m["qa"][0]["answers"] == ["white"] * 7 + ["white7", "white8", "white9"]
    assert m["qa"][0]["question_type"] == "what color is the"
    assert samples["COCO_val2014_000000000002"]["jpg"] == (root / "000000000002.jpg").read_bytes()
    skipped = skips(out, q_file)
    assert skipped["5 (entry 3): COCO_val2014_000000000003"].startswith(
        f"missing_file: image not found: {root}/COCO_val2014_000000000003.jpg, ")  # fmt: skip
    assert skipped["6 (entry 4): COCO_val2014_000000000004"].startswith("unreadable: ")
    assert skipped["7 (entry 5): -"].startswith("bad_entry: image_id and question_id must be integers")
    assert skipped["9 (entry 7): COCO_val2014_000000000002"] == "bad_entry: question_id 21 has no annotation"
    sample = samples["COCO_val2014_000000000001"]  # no caption: decoded without, qa read as evaluation does
    got = decode(sample, "k", ["image"], caption=False)
    assert tuple(got["image"].shape) == (3, 32, 32)
    assert eval_extras(sample, got["fields"])[schema.QA] == m["qa"]


# ----------------------------------------------------------------------------- MSVD-QA / MSRVTT-QA / TGIF-QA


def test_videoqa(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "clips"
    write(root / "-4wsuPCjDBc_5_15.avi", avi(1.0))  # MSVD: vid1 by youtube_mapping.txt
    write(root / "vid2.mp4", video(1.0))
    write(root / "vid4.mp4", GARBAGE)
    write(root / "tumblr_nk172bbdPI1u1lr18o1_250.gif",
          media.encode_video(np.full((4, 16, 16, 3), 90, np.uint8), FPS, "gif"))  # fmt: skip
    mapping = write(tmp_path / "youtube_mapping.txt", "-4wsuPCjDBc_5_15 vid1\nabcdefghijk_1_9 vid2\n")
    msvd = [{"answer": "man", "id": 0, "question": "who is cutting something?", "video_id": 1},
            {"answer": "onion", "id": 1, "question": "what is a man cutting?", "video_id": 1},
            {"answer": "dog", "id": 2, "question": "what runs?", "video_id": 2},
            {"answer": "cat", "id": 3, "question": "who sleeps?", "video_id": 3},  # no file
            {"answer": "car", "id": 4, "question": "what drives?", "video_id": 4},  # undecodable
            {"answer": "x", "id": 5, "question": "", "video_id": 2}]  # malformed  # fmt: skip
    qa_json = write(tmp_path / "test_qa.json", json_lines(msvd))
    tsv = write_csv(tmp_path / "Test_action_question.tsv", [
        ["gif_name", "question", "a1", "a2", "a3", "a4", "a5", "answer", "vid_id", "key"],
        ["tumblr_nk172bbdPI1u1lr18o1_250", "what does the man do 3 times?", "nod", "wave", "jump", "blink",
         "clap", "1", "gif1", "7"]], delimiter="\t")  # fmt: skip
    out = tmp_path / "out"
    assert make("videoqa", [qa_json, mapping, tsv], out, root, capsys=capsys) == (6, BAD3)
    samples = shards(out)
    assert list(samples) == ["1", "2", "tumblr_nk172bbdPI1u1lr18o1_250"]
    assert meta(samples["1"]) == {"captions": {}, "source": "videoqa", "video_id": 1, "qa": [
        {"q": "who is cutting something?", "a": "man", "type": "who", "question_id": 0},
        {"q": "what is a man cutting?", "a": "onion", "type": "what", "question_id": 1}]}  # fmt: skip
    assert probe(samples["1"]["mp4"])["frames"] == 8  # the AVI remuxed into MP4, all its frames
    assert samples["2"]["mp4"] == (root / "vid2.mp4").read_bytes()  # the mapping's name is absent: vid2.mp4
    tgif = samples["tumblr_nk172bbdPI1u1lr18o1_250"]
    choices = ["nod", "wave", "jump", "blink", "clap"]
    assert set(tgif) == {"gif", "json"} and meta(tgif)["qa"] == [
        {"q": "what does the man do 3 times?", "a": "wave", "choices": choices, "type": "what",
         "question_id": "7"}]  # fmt: skip
    skipped = skips(out, qa_json)
    assert skipped["5 (entry 3): 3"].startswith(f"missing_file: video not found: {root}/3.")
    assert f"{root}/video3.mp4, " in skipped["5 (entry 3): 3"]
    assert skipped["6 (entry 4): 4"].startswith("unreadable: ")
    assert skipped["7 (entry 5): 2"] == "bad_entry: empty question"
    for key in samples:
        got = decode(samples[key], key, ["video"], caption=False)
        assert tuple(got["video"].shape) == (2, 3, 32, 32)
        assert eval_extras(samples[key], got["fields"])[schema.QA] == meta(samples[key])["qa"]


# ----------------------------------------------------------------------------- classification


def test_imagefolder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "train"
    write(root / "n01440764" / "n01440764_10026.JPEG", jpeg(80))
    write(root / "n01440764" / "more" / "n01440764_1.png", png(85))
    write(root / "n01443537" / "n01443537_2.jpg", GARBAGE)
    write(root / "n01443537" / "README.txt", "not an image")
    write(root / ".cache" / "x.jpg", jpeg(1))  # hidden: not a class
    (root / "n01484850").mkdir()  # a class without images keeps its index
    out = tmp_path / "out"
    assert make("imagefolder", [], out, root, capsys=capsys) == (3, {"unreadable": 1})
    assert json.loads((out / "classes.json").read_text()) == ["n01440764", "n01443537", "n01484850"]
    samples = shards(out)
    assert list(samples) == ["n01440764_more_n01440764_1", "n01440764_n01440764_10026"]
    want = {"captions": {}, "source": "train", "label": "n01440764", "label_index": 0}
    assert meta(samples["n01440764_n01440764_10026"]) == want
    assert set(samples["n01440764_more_n01440764_1"]) == {"png", "json"}
    assert skips(out, root)["n01443537/n01443537_2.jpg: n01443537_n01443537_2"].startswith(
        "unreadable: n01443537_2.jpg: "
    )
    got = decode(samples["n01440764_n01440764_10026"], "k", ["image"], caption=False)
    assert tuple(got["image"].shape) == (3, 32, 32)

    val = tmp_path / "val"  # another split takes the first run's class list
    write(val / "n01484850" / "v1.jpg", jpeg(90))
    write(val / "n09999999" / "v2.jpg", jpeg(95))
    out_val = tmp_path / "out_val"
    make("imagefolder", [out / "classes.json"], out_val, val, capsys=capsys)
    ((key, sample),) = shards(out_val).items()
    assert (key, meta(sample)["label"], meta(sample)["label_index"]) == ("n01484850_v1", "n01484850", 2)
    assert (out_val / "classes.json").read_bytes() == (out / "classes.json").read_bytes()
    assert skips(out_val, val)["n09999999/v2.jpg: n09999999_v2"] == (
        "bad_entry: class 'n09999999' is not in the given classes.json")  # fmt: skip


def test_labels_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "audio"
    write(root / "1-100038-A-14.wav", wav(1.0))
    write(root / "rooster.flac", wav(1.0, fmt="FLAC", seed=1))
    write(root / "talk.mp4", video(1.0))
    write(root / "broken.wav", GARBAGE)
    ann = write_csv(tmp_path / "esc50.csv", [
        ["filename", "fold", "category"], ["1-100038-A-14.wav", "1", "chirping_birds"],
        ["rooster", "2", "rooster"], ["talk.mp4", "3", "Speech,Music"], ["gone.wav", "1", "dog"],
        ["broken.wav", "1", "dog"], ["1-100038-A-14.wav", "1", "wind"], ["only one field"]])  # fmt: skip
    out = tmp_path / "out"
    assert make("labels-csv", [ann], out, root, capsys=capsys) == (6, BAD3)
    classes = ["Music", "Speech", "chirping_birds", "dog", "rooster", "wind"]  # every label of the file
    assert json.loads((out / "classes.json").read_text()) == classes
    samples = shards(out)
    assert list(samples) == ["1-100038-A-14", "rooster", "talk"]
    assert meta(samples["1-100038-A-14"]) == {  # two rows of one file: one sample, both labels
        "captions": {}, "source": "labels-csv", "fold": "1", "label": "chirping_birds", "label_index": 2,
        "labels": ["chirping_birds", "wind"], "label_indices": [2, 5]}  # fmt: skip
    assert set(samples["rooster"]) == {"flac", "json"} and meta(samples["rooster"])["label_index"] == 4
    talk = meta(samples["talk"])  # a quoted field with commas: multi-label; a video keeps its sound
    assert (talk["labels"], talk["label_indices"], talk["label"]) == (["Speech", "Music"], [1, 0], "Speech")
    skipped = skips(out, ann)
    assert skipped["5: gone"] == f"missing_file: media file not found: {root}/gone.wav"
    assert skipped["6: broken"].startswith("unreadable: ")
    assert skipped["8: -"] == "bad_entry: malformed CSV row: 1 fields, the header has 3"
    talk_video = decode(samples["talk"], "k", ["video", "audio"], caption=False)["video"]
    assert tuple(talk_video.shape) == (2, 3, 32, 32)
    assert decode(samples["rooster"], "k", ["audio"], caption=False)["audio"].shape[-2] == INPUTS.mel_bins
