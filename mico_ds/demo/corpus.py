"""The built-in demo corpus, written from the demo world (``mico_ds.demo.world``).

Nothing is downloaded: every sample is rendered from an attribute tuple (the samples and their
captions are described in ``mico_ds.demo.world``). The held-out ``val`` split draws distinct attribute
tuples (so its concatenated captions are unique, for retrieval evaluation); the held-out ``tune``
split (choices made before reporting on ``val``, e.g. ``eval.rerank_weight``) draws distinct tuples
used by neither ``val`` nor ``train`` (drawn last: both are unchanged by it), and ``train`` never uses
a ``val`` tuple. Three single-pair
corpora exercise corpus mixing and joined samples (MiCo Eq. 3): ``image_text`` (jpg + txt, the
img2dataset/OpenCLIP layout), ``audio_text`` (flac + json) and ``video_text`` (mp4 + json).

Layout under ``out_dir``::

    omni/train-000000.tar ...  omni/val-000000.tar ...  omni/tune-000000.tar ...  omni/sizes.json
    image_text/train-*.tar  audio_text/train-*.tar  video_text/train-*.tar   (each with sizes.json)
    image_text/val-*.tar  image_text/test-*.tar   with num_pair_heldout > 0 (see draw_heldout_pairs)
    tokenizer/tokenizer.model   SentencePiece (Llama-2 settings) trained on the train and val captions
    demo.json                   parameters, counts, shard patterns; written last (= corpus complete)

Every random choice comes from ``numpy.random.default_rng([seed, corpus, split, index])``, so the
shards are byte-identical for one seed whatever the number of worker processes.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mico_ds.data import schema
from mico_ds.data.write.media import (
    encode_flac,
    encode_jpeg,
    encode_mp4,
    encode_normal_png,
    encode_png16,
)
from mico_ds.data.write.tar import shard_pattern, write_json_atomic, write_sizes, write_tar
from mico_ds.demo.world import (
    CAPTION_FIELDS_OF,
    CORPORA,
    CORPUS_ID,
    NUM_COMBINATIONS,
    SPLIT_ID,
    DemoParams,
    captions_for,
    decode_attributes,
    joined_caption,
    motion_path,
    qa_for,
    render_audio,
    render_depth,
    render_frames,
)

FORMAT_VERSION = 2  # 2: omni json members carry "qa" (media and captions unchanged from 1)
INDEX_FILE = "demo.json"
LOCK_FILE = ".demo.lock"


# ----------------------------------------------------------------------------- sample builders


def _rng(params: DemoParams, corpus: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([params.seed, CORPUS_ID[corpus], SPLIT_ID[split], index])


def sample_key(corpus: str, split: str, index: int) -> str:
    """Sample key, unique across the demo corpora: e.g. ``omni-train-000012``."""
    return f"{corpus.replace('_', '')}-{split}-{index:06d}"


def build_sample(params: DemoParams, corpus: str, split: str, index: int, code: int) -> dict[str, bytes]:
    """Tar members ``{ext: bytes}`` of one demo sample of ``corpus`` with attribute code ``code``."""
    a = decode_attributes(code)
    caps = captions_for(a)
    rng = _rng(params, corpus, split, index)
    members: dict[str, bytes] = {}
    s = params.image_size
    if corpus in ("omni", "image_text", "video_text"):
        xy, r = motion_path(a, rng, s, params.num_frames)
        frames = render_frames(a, xy, r, s)
        mid = len(frames) // 2
        if corpus in ("omni", "image_text"):
            members["jpg"] = encode_jpeg(frames[mid], quality=90)
        if corpus in ("omni", "video_text"):
            members["mp4"] = encode_mp4(frames, params.fps)
        if corpus == "omni" and params.with_frames:
            for i, frame in enumerate(frames):
                members[f"{schema.FRAME_PREFIX}{i}.jpg"] = encode_jpeg(frame, quality=90)
    if corpus in ("omni", "audio_text"):
        members["flac"] = encode_flac(
            render_audio(a, rng, params.sample_rate, params.audio_seconds), params.sample_rate
        )
    if corpus == "omni":
        depth, normals = render_depth(a, rng, float(xy[mid, 0]), float(xy[mid, 1]), r, s)
        members["depth.png"] = encode_png16(depth)
        members["normal.png"] = encode_normal_png(normals)
    if corpus == "image_text":
        members[schema.TXT_EXT] = caps["vision"].encode()
    else:
        meta = {
            "captions": {f: caps[f] for f in CAPTION_FIELDS_OF[corpus]},
            "category": a["pitch"] if corpus == "audio_text" else a["shape"],
            "source": f"demo-{corpus.replace('_', '-')}",
        }
        if corpus == "omni":
            meta["qa"] = qa_for(a)
        members[schema.JSON_EXT] = json.dumps(meta, sort_keys=True).encode()
    return members


def draw_codes(params: DemoParams) -> dict[tuple[str, str], np.ndarray]:
    """Attribute codes per (corpus, split): val distinct, train disjoint from val, tune distinct and
    disjoint from both, single-pair free."""
    out: dict[tuple[str, str], np.ndarray] = {}
    rng = np.random.default_rng([params.seed, 1000])  # val first: train is drawn to avoid its tuples
    val = (
        rng.choice(NUM_COMBINATIONS, size=params.num_val, replace=False)
        if params.num_val
        else np.zeros(0, np.int64)
    )
    val_codes = set(val.tolist())
    held_out = val_codes
    train = rng.integers(0, NUM_COMBINATIONS, size=params.num_train)
    for i in range(len(train)):
        while int(train[i]) in held_out:  # rare: num_val / 663,552 per draw
            train[i] = rng.integers(0, NUM_COMBINATIONS)
    # tune last, from its own generator, avoiding val and train: both are what they were without it
    tune = np.zeros(0, np.int64)
    if params.num_tune:
        taken = val_codes | set(train.tolist())
        size = min(NUM_COMBINATIONS, params.num_tune + len(taken))  # >= num_tune outside val and train
        draw = np.random.default_rng([params.seed, 1001]).choice(NUM_COMBINATIONS, size=size, replace=False)
        tune = np.asarray([c for c in draw.tolist() if c not in taken][: params.num_tune], np.int64)
    out["omni", "train"] = train.astype(np.int64)
    if params.num_val:
        out["omni", "val"] = np.asarray(val, dtype=np.int64)
    if params.num_tune:
        out["omni", "tune"] = tune
    if params.single_pair:
        for corpus in ("image_text", "audio_text", "video_text"):
            sp_rng = np.random.default_rng([params.seed, 1000 + CORPUS_ID[corpus]])
            out[corpus, "train"] = sp_rng.integers(0, NUM_COMBINATIONS, size=params.num_single_pair).astype(
                np.int64
            )
        if params.num_pair_heldout:
            taken = {int(c) for cs in out.values() for c in cs}
            out["image_text", "val"], out["image_text", "test"] = draw_heldout_pairs(params, taken)
    return out


def draw_heldout_pairs(params: DemoParams, taken: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """The image_text corpus as a downstream dataset: ``num_pair_heldout`` val and as many test items,
    from their own generator (every other split is unchanged by them), avoiding every code of the
    other splits (the pretraining run never saw these tuples; their captions may repeat training ones, of
    which there are only 1,536 distinct) and with distinct vision captions across both (retrieval
    ground truth is one-to-one: only the vision caption is stored)."""
    n = params.num_pair_heldout
    rng = np.random.default_rng([params.seed, 1000 + CORPUS_ID["image_text"], SPLIT_ID["test"]])
    picked: list[int] = []
    caps: set[str] = set()
    for c in rng.permutation(NUM_COMBINATIONS).tolist():
        cap = captions_for(decode_attributes(c))["vision"]
        if c in taken or cap in caps:
            continue
        picked.append(c)
        caps.add(cap)
        if len(picked) == 2 * n:
            break
    if len(picked) < 2 * n:
        raise ValueError(f"num_pair_heldout={n}: only {len(picked) // 2} distinct vision captions per split")
    return np.asarray(picked[:n], np.int64), np.asarray(picked[n:], np.int64)


def _write_shard(
    params: DemoParams, corpus: str, split: str, shard: int, start: int, codes: np.ndarray, path: str
) -> int:
    samples = (
        (sample_key(corpus, split, start + j), build_sample(params, corpus, split, start + j, int(c)))
        for j, c in enumerate(codes)
    )
    return write_tar(path, samples)


def _shard_tasks(
    params: DemoParams, codes: dict[tuple[str, str], np.ndarray], out: Path
) -> list[tuple[Any, ...]]:
    tasks = []
    for (corpus, split), cs in codes.items():
        for shard, start in enumerate(range(0, len(cs), params.samples_per_shard)):
            path = out / corpus / f"{split}-{shard:06d}.tar"
            tasks.append(
                (corpus, split, shard, start, cs[start : start + params.samples_per_shard], str(path))
            )
    return tasks


def _clean(out: Path) -> None:
    """Remove what an earlier generation may have left: only files this module writes."""
    (out / INDEX_FILE).unlink(missing_ok=True)
    for corpus in CORPORA:
        d = out / corpus
        if d.is_dir():
            for p in [
                *d.glob("test-*.tar"),
                *d.glob("train-*.tar"),
                *d.glob("val-*.tar"),
                *d.glob("tune-*.tar"),
                *d.glob(".*.tmp*"),
                d / schema.SIZES_FILE,
            ]:
                p.unlink(missing_ok=True)


def make_demo_corpus(
    out_dir: str | Path,
    *,
    num_train: int = 2048,
    num_val: int = 256,
    num_tune: int = 128,
    seed: int = 0,
    samples_per_shard: int = 256,
    image_size: int = 64,
    num_frames: int = 8,
    audio_seconds: float = 2.0,
    sample_rate: int = 16000,
    with_frames: bool = True,
    single_pair: bool = True,
    num_single_pair: int | None = None,
    vocab_size: int = 512,
    num_pair_heldout: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Generate the demo corpus under ``out_dir`` (see the module docstring); returns demo.json's content.

    Args:
        num_train / num_val: omni samples in the train / held-out split.
        num_tune: omni samples in the held-out tuning split (``omni/tune-*.tar``, distinct from val).
        seed: every random choice derives from it; same seed -> byte-identical shards.
        samples_per_shard: samples per tar shard.
        image_size: square frame side (even).
        num_frames: video frames T (spanning ``audio_seconds``).
        audio_seconds / sample_rate: audio clip length and rate.
        with_frames: also store the frames as ``frame{i}.jpg`` members in omni samples.
        single_pair: also write image_text, audio_text and video_text.
        num_single_pair: samples per single-pair corpus (default num_train // 2).
        vocab_size: requested SentencePiece vocabulary size.
        num_pair_heldout: image_text val and test items each (:func:`draw_heldout_pairs`; 0: none).
        progress: show a tqdm progress bar.
        workers: processes rendering shards in parallel (default: the usable CPUs, at most 8, and
            no more than there are shards); the output is byte-identical for any value.
    """
    from tqdm import tqdm

    from mico_ds.data.tokenizer import train_sentencepiece

    params = DemoParams(
        num_train=num_train, num_val=num_val, num_tune=num_tune, seed=seed,
        samples_per_shard=samples_per_shard, image_size=image_size, num_frames=num_frames,
        audio_seconds=audio_seconds, sample_rate=sample_rate, with_frames=with_frames,
        single_pair=single_pair, num_single_pair=num_single_pair, vocab_size=vocab_size,
        num_pair_heldout=num_pair_heldout,
    )  # fmt: skip
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    codes = draw_codes(params)
    for corpus, _ in codes:
        (out / corpus).mkdir(exist_ok=True)
    tasks = _shard_tasks(params, codes, out)
    total = sum(len(c) for c in codes.values())
    # Starting worker processes costs some 0.1-1 s: not worth it for a tiny corpus unless asked for.
    workers = min(workers or (default_workers() if total >= 512 else 1), len(tasks))
    sizes: dict[str, dict[str, int]] = {}
    with tqdm(total=total, desc="demo corpus", unit="sample", disable=not progress) as bar:
        if workers == 1:
            results = (_write_shard(params, *t) for t in tasks)
            for task, n in zip(tasks, results):
                sizes.setdefault(task[0], {})[Path(task[5]).name] = n
                bar.update(n)
        else:
            # fork (as a DataLoader does): spawn would re-import the caller's __main__, which breaks for
            # stdin and unguarded scripts. The children only use numpy/Pillow/PyAV/soundfile, never the
            # parent's threads (torch, gloo), so copying a threaded parent is harmless here.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                futures = [pool.submit(_write_shard, params, *t) for t in tasks]
                for task, fut in zip(tasks, futures):
                    n = fut.result()
                    sizes.setdefault(task[0], {})[Path(task[5]).name] = n
                    bar.update(n)
    for corpus, s in sizes.items():
        write_sizes(out / corpus, s)

    # Captions: val must be unique when concatenated (retrieval ground truth is one-to-one).
    val_caps = [
        joined_caption(captions_for(decode_attributes(int(c)))) for c in codes.get(("omni", "val"), [])
    ]
    if len(set(val_caps)) != len(val_caps):
        raise AssertionError("demo val captions are not unique")  # the attribute -> caption map is injective
    # Not the tune captions nor the held-out pairs': adding those splits leaves the tokenizer (and every
    # token id) unchanged.
    all_caps = [
        text
        for (corpus, split), cs in codes.items()
        if split != "tune" and (corpus, split) not in (("image_text", "val"), ("image_text", "test"))
        for c in cs
        for f, text in captions_for(decode_attributes(int(c))).items()
        if f in CAPTION_FIELDS_OF[corpus]
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = train_sentencepiece(all_caps, out / "tokenizer", vocab_size=vocab_size, seed=seed)
    import sentencepiece as spm

    got_vocab = spm.SentencePieceProcessor(model_file=str(model)).vocab_size()
    corpora: dict[str, Any] = {}
    for (corpus, split), cs in codes.items():
        n_shards = sum(1 for name in sizes[corpus] if name.startswith(f"{split}-"))
        entry = corpora.setdefault(corpus, {"modalities": list(CORPORA[corpus]), "splits": {}})
        if len(cs):
            entry["splits"][split] = {
                "shards": f"{corpus}/{shard_pattern(split, n_shards)}",
                "num_samples": len(cs),
                "num_shards": n_shards,
            }
    index = {
        "format_version": FORMAT_VERSION,
        "generator": "mico_ds.demo",
        "params": asdict(params),
        "fps": params.fps,
        "corpora": corpora,
        "tokenizer": {"path": f"tokenizer/{model.name}", "vocab_size": got_vocab, "requested": vocab_size,
                      "note": [str(w.message) for w in caught]},
        "num_attribute_combinations": NUM_COMBINATIONS,
        "val_captions_unique": True,
        "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    write_json_atomic(out / INDEX_FILE, index)  # last: its presence means the corpus is complete
    return index


def _matching_index(out: Path, params: DemoParams) -> dict[str, Any] | None:
    try:
        index = json.loads((out / INDEX_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if index.get("format_version") != FORMAT_VERSION or index.get("params") != asdict(params):
        return None
    sizes_ok = all((out / c / schema.SIZES_FILE).is_file() for c in index.get("corpora", {}))
    return index if sizes_ok and (out / index["tokenizer"]["path"]).is_file() else None


def ensure_demo_corpus(out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Return the demo corpus index of ``out_dir``, generating the corpus when missing or different.

    Takes the keyword arguments of ``make_demo_corpus``. Safe to call from several processes at once
    (e.g. every rank of a job sharing a file system): an exclusive ``fcntl.flock`` on
    ``out_dir/.demo.lock`` lets one process generate while the others wait, then find demo.json.
    Do not point two jobs with different parameters at one directory while either is training.
    """
    params = DemoParams(**{k: v for k, v in kwargs.items() if k not in ("progress", "workers")})
    out = Path(out_dir)
    index = _matching_index(out, params)
    if index is not None:
        return index
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # blocks until the generating process is done
        try:
            index = _matching_index(out, params)
            if index is not None:
                return index
            return make_demo_corpus(out, **kwargs)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def default_workers() -> int:
    """Worker processes for generation: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))
