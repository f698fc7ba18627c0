"""WavCaps (Mei et al., 2023; github.com/XinhaoMei/WavCaps, huggingface.co/datasets/cvssp/WavCaps): one JSON
file per source, ``{"num_captions_per_audio": 1, "data": [{"id", "caption", "duration", "audio", ...}]}``:

    json_files/AudioSet_SL/as_final.json       id "Y-0OkG0fLLkc.wav"
    json_files/BBC_Sound_Effects/bbc_final.json id "07066104"
    json_files/FreeSound/fsd_final.json        id "180913"
    json_files/SoundBible/sb_final.json        id "2219"

The published ``audio`` field is a placeholder (``"wav_path"``); the audio is ``<id stem>.flac`` in
the unzipped waveform folders (``AudioSet_SL_flac/``, ``BBC_Sound_Effects_flac/``, ``FreeSound_flac/``,
``SoundBible_flac/``). Under the media root each of ``<Source>_flac/``, ``<Source>/`` and the root
itself is looked in (``.flac``, then ``.wav``); an ``audio`` value that is a real relative path is tried
first. Samples are audio only: ``captions.audio`` (a list when the file has several captions per audio),
``category`` = the source, keys ``<as|bbc|fsd|sb>_<id stem>``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mico_ds.data.write.formats.common import (
    ClipFile,
    Format,
    Options,
    Record,
    bad,
    candidates,
    caption_list,
    iter_json_array,
    make_key,
)

SOURCES = {  # published file name -> (source folder, key prefix)
    "as_final": ("AudioSet_SL", "as"),
    "bbc_final": ("BBC_Sound_Effects", "bbc"),
    "fsd_final": ("FreeSound", "fsd"),
    "sb_final": ("SoundBible", "sb"),
}
PLACEHOLDER = "wav_path"
AUDIO_SUFFIXES = (".flac", ".wav", ".mp3")


def source_of(path: Path) -> tuple[str, str]:
    """(source name, key prefix) of a WavCaps JSON file, from its name (else its folder's)."""
    if path.stem in SOURCES:
        return SOURCES[path.stem]
    name = path.parent.name if path.parent.name not in ("", "json_files") else path.stem
    return name, make_key(name).lower()


def read(annotations: list[Path], options: Options) -> Iterator[Record]:
    root = options.media_root or Path(".")
    for path in annotations:
        name, prefix = source_of(path)
        source = options.source or "wavcaps"
        head: dict = {}
        for line, index, item in iter_json_array(path, member="data", header=head):
            n = head.get("num_captions_per_audio", 1)
            n = n if isinstance(n, int) and n >= 1 else 1
            where = f"{path}:{line} (entry {index})"
            if not isinstance(item, dict):
                yield bad(where, "", "bad_entry", f"expected an object, got {type(item).__name__}", source)
                continue
            try:
                stem = str(item.get("id", "")).strip()
                for s in AUDIO_SUFFIXES:
                    if stem.lower().endswith(s):
                        stem = stem[: -len(s)]
                key = f"{prefix}_{make_key(stem)}"
                names = [f"caption_{i}" for i in range(1, n + 1)] if n > 1 else ["caption"]
                caps = [c for nm in names for c in caption_list(item.get(nm), nm)]
            except ValueError as e:
                yield bad(where, "", "bad_entry", f"{e}", source)
                continue
            if not caps:
                yield bad(where, key, "bad_entry", "no caption", source)
                continue
            files = []
            audio = item.get("audio")
            if isinstance(audio, str) and audio and audio != PLACEHOLDER and not Path(audio).is_absolute():
                files.append(audio)
            for folder in (f"{name}_flac", name, "."):
                files += [f"{folder}/{stem}{s}" for s in AUDIO_SUFFIXES[:2]]
            yield Record(
                where, key, audio=ClipFile(candidates(root, files)),
                captions={"audio": caps if n > 1 else caps[0]}, source=source, meta={"category": name},
            )  # fmt: skip


FORMAT = Format(
    name="wavcaps",
    help="WavCaps: {as,bbc,fsd,sb}_final.json {data: [{id, caption, ...}]}; "
    "<Source>_flac/<id>.flac under --media-root",
    read=read,
)
