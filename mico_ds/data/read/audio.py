"""Decoding of audio members: mono waveform at ``inputs.sample_rate``, Kaldi log-mel filterbank, clips.

audio   (N, 1, F, Tm)    soundfile (flac/wav) or PyAV (mp3, m4a, aac, ogg, opus, and the audio
                         stream of an mp4/webm video member when a sample has no audio member),
                         mono, resampled with PyAV's AudioResampler (libswresample) to
                         inputs.sample_rate, Kaldi log-mel filterbank (kaldi-native-fbank, the
                         torchaudio.compliance.kaldi.fbank settings of MiCo/VAST/AST), normalized
                         (fbank - mean) / (2 std), cut into N clips of Tm frames

``data.limits.audio_seconds`` is checked on the header (soundfile's, the container's) and again on
the samples as they are read, so a member's memory stays bounded whatever its header claims.

A container without an audio stream is ``bad_audio`` when it is an audio member (a file that claims
to be audio) and :data:`NO_AUDIO_STREAM` when it is a video member read for its track (a silent
video is valid data, only not for an audio corpus).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from mico_ds.config import DecodeLimits, InputConfig
from mico_ds.data import schema
from mico_ds.data.read import limits as L
from mico_ds.data.read.skips import SkipSample

# Kaldi frame geometry used by MiCo's audio processor (torchaudio.compliance.kaldi.fbank defaults).
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
# One int16 LSB on a [-1, 1] waveform: Kaldi's default dither (1.0 on int16 samples), applied only in
# training, from the per-sample generator (kaldi-native-fbank's own dither RNG is not seedable).
TRAIN_DITHER = 1.0 / 32768.0
DITHER_BLOCK = 1 << 16
RESAMPLE_BLOCK = 1 << 16  # input samples per resampler frame
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 1_536_000  # outside: no recording format (8 x 192 kHz)
# soundfile reads in blocks of about this many samples (all channels), mixed to mono block by block.
READ_BLOCK_SAMPLES = 1 << 18
# libsndfile's "length unknown" (SF_COUNT_MAX, e.g. a FLAC written to a pipe): PyAV decodes those.
UNKNOWN_FRAMES = 1 << 62
NO_AUDIO_STREAM = "no_audio_stream"  # skip reason: a video member read for audio has no audio stream


# ----------------------------------------------------------------------------- audio


class MonoStream:
    """Mono float32 blocks at ``rate`` -> one waveform at ``target``, resampled block by block with
    PyAV's AudioResampler (libswresample): bit for bit the output of one call on the whole waveform,
    without ever holding the waveform at the source rate."""

    def __init__(self, rate: int, target: int) -> None:
        check_rate(rate)
        self.rate, self.parts, self.samples = rate, [], 0
        self.rs = None
        if rate != target:
            import av

            self.rs = av.AudioResampler(format="flt", layout="mono", rate=target)

    def _frames(self, frames: list) -> None:
        for f in frames:
            self.parts.append(f.to_ndarray()[0])
            self.samples += len(self.parts[-1])

    def add(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.float32)
        if self.rs is None:
            self.parts.append(block)
            self.samples += len(block)
            return
        import av

        frame = av.AudioFrame.from_ndarray(block[None], format="flt", layout="mono")
        frame.sample_rate = self.rate
        self._frames(self.rs.resample(frame))

    def finish(self) -> np.ndarray:
        if self.rs is not None:
            self._frames(self.rs.resample(None))  # flush the filter's delay line
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 waveform at ``rate`` -> ``target`` Hz with PyAV's AudioResampler (libswresample)."""
    if rate == target:
        return wave
    out = MonoStream(rate, target)
    for i in range(0, len(wave), RESAMPLE_BLOCK):
        out.add(wave[i : i + RESAMPLE_BLOCK])
    return out.finish()


def check_rate(rate: int) -> None:
    """Refuse sample rates no recording has: libswresample's filter for a ratio of ~10^4 down takes
    gigabytes (a WAV header claiming 250 MHz: 2 GB and seconds for 16,000 samples), and 1 Hz up to
    16 kHz some 30 bytes per output sample."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise SkipSample("bad_audio", f"sample rate {rate} Hz outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]")


def _read_soundfile(data: bytes, sample_rate: int, lim: DecodeLimits) -> np.ndarray | None:
    """flac/wav through soundfile, mixed to mono and resampled block by block; None when its length
    is unknown (PyAV reads those)."""
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data)) as f:
        rate, frames, channels = int(f.samplerate), int(f.frames), max(1, int(f.channels))
        check_rate(rate)
        if frames >= UNKNOWN_FRAMES:
            return None
        L.check("audio_seconds", frames / rate, lim, f"audio header: {frames} frames at {rate} Hz")
        out = MonoStream(rate, sample_rate)
        block, total = max(1, READ_BLOCK_SAMPLES // channels), 0
        while total < frames:
            b = f.read(min(block, frames - total), dtype="float32", always_2d=True)
            if len(b) == 0:
                break
            total += len(b)
            out.add(b.mean(axis=1))
    return out.finish()


def _read_av(data: bytes, sample_rate: int, lim: DecodeLimits, no_stream: str = "bad_audio") -> np.ndarray:
    """Any container PyAV opens: its first audio stream, mono at ``sample_rate``; the skip
    ``no_stream`` when it has none."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:  # BytesIO shares the bytes, no copy
        if not container.streams.audio:
            raise SkipSample(no_stream, "no audio stream")
        stream = container.streams.audio[0]
        if stream.duration and stream.time_base:
            L.check("audio_seconds", float(stream.duration * stream.time_base), lim, "audio stream duration")
        elif container.duration:
            L.check("audio_seconds", container.duration / 1e6, lim, "container duration")
        cap = int(lim.audio_seconds * sample_rate) if lim.audio_seconds else 0
        rs = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks, total = [], 0
        for frame in container.decode(stream):
            check_rate(frame.sample_rate)
            for f in rs.resample(frame):
                chunks.append(f.to_ndarray()[0])
                total += len(chunks[-1])
            if cap and total > cap:  # the header said less (or nothing): the samples decide
                cut = f"decoded past data.limits.audio_seconds={lim.audio_seconds}"
                raise SkipSample(L.TOO_LONG_AUDIO, cut)
        chunks += [f.to_ndarray()[0] for f in rs.resample(None)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def load_waveform(data: bytes, ext: str, sample_rate: int, limits: DecodeLimits | None = None) -> np.ndarray:
    """Encoded audio -> mono float32 at ``sample_rate`` (soundfile for flac/wav, else PyAV; ``ext``
    a video member's (schema.AUDIO_TRACK_EXTS): its audio stream, :data:`NO_AUDIO_STREAM` if none)."""
    if not data:
        raise SkipSample("bad_audio", "empty member")
    lim = L.resolve(limits)
    no_stream = NO_AUDIO_STREAM if ext in schema.AUDIO_TRACK_EXTS else "bad_audio"
    try:
        wave = _read_soundfile(data, sample_rate, lim) if ext in ("flac", "wav") else None
        if wave is None:
            wave = _read_av(data, sample_rate, lim, no_stream)
    except SkipSample:
        raise
    except Exception as e:
        raise SkipSample("bad_audio", f"{type(e).__name__}: {e}") from None
    if not np.isfinite(wave).all():  # a float WAV may hold NaN / inf: no filterbank of those
        raise SkipSample("bad_audio", "non-finite samples (NaN or inf)")
    return wave


_FBANK_OPTS: dict[tuple[int, int, bool], object] = {}


def kaldi_fbank(wave: np.ndarray, sample_rate: int, mel_bins: int, dither: float = 0.0) -> np.ndarray:
    """Kaldi log-mel filterbank (frames, mel_bins), the settings of MiCo's audio processor.

    Equivalent to ``torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=sr,
    use_energy=False, window_type='hanning', num_mel_bins=mel_bins, dither=dither, frame_shift=10)``
    (25 ms frames, pre-emphasis 0.97, DC removal, power spectrum, mel range 20 Hz - Nyquist, log
    floored at float32 eps, snip_edges). Returns (0, mel_bins) for input shorter than one frame.
    ``dither`` must be 0 here: callers add seeded dither themselves (reproducible on resume).
    """
    import kaldi_native_fbank as knf

    if dither != 0.0:
        raise ValueError("kaldi_fbank takes dither=0; add seeded noise to the waveform instead")
    key = (sample_rate, mel_bins, True)
    opts = _FBANK_OPTS.get(key)
    if opts is None:
        opts = knf.FbankOptions()
        opts.frame_opts.samp_freq = float(sample_rate)
        opts.frame_opts.frame_length_ms = FRAME_LENGTH_MS
        opts.frame_opts.frame_shift_ms = FRAME_SHIFT_MS
        opts.frame_opts.dither = 0.0
        opts.frame_opts.window_type = "hanning"
        opts.frame_opts.snip_edges = True
        opts.mel_opts.num_bins = mel_bins
        opts.use_energy = False
        opts.htk_compat = True
        _FBANK_OPTS[key] = opts
    fb = knf.OnlineFbank(opts)
    # A Python list crosses pybind11 faster than a numpy array for Sequence[float] arguments.
    fb.accept_waveform(float(sample_rate), np.asarray(wave, dtype=np.float32).tolist())
    fb.input_finished()
    n = fb.num_frames_ready
    if n == 0:
        return np.zeros((0, mel_bins), np.float32)
    return np.stack([fb.get_frame(i) for i in range(n)]).astype(np.float32, copy=False)


def audio_clips(
    wave: np.ndarray,
    inputs: InputConfig,
    train: bool,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Mono waveform at inputs.sample_rate -> (N, 1, F, Tm) normalized log-mel clips.

    As MiCo/VAST's audio processor: the filterbank is split into slices of Tm frames (at least N of
    them, zero-padded after normalization), the slices into N uniform segments, and one slice taken
    per segment -- random in training, the middle one in evaluation. Only the chosen slices'
    samples go through the filterbank; Kaldi frames are local, so this equals slicing the
    filterbank of the whole waveform.
    """
    sr, tm, n_clips, f = inputs.sample_rate, inputs.clip_frames, inputs.num_clips, inputs.mel_bins
    flen = int(sr * FRAME_LENGTH_MS / 1000)
    shift = int(sr * FRAME_SHIFT_MS / 1000)
    wave = np.asarray(wave, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # samples near float32's range: NaN, refused below
        wave = wave - wave.mean() if wave.size else wave  # AST/VAST remove the waveform's DC first
    if train:
        if rng is None:
            raise ValueError("training-mode decoding needs a per-sample generator (rng)")
        # In blocks: the same draws as one call, without a float64 array as long as the waveform.
        for i in range(0, len(wave), DITHER_BLOCK):
            block = wave[i : i + DITHER_BLOCK]
            block += (TRAIN_DITHER * rng.standard_normal(len(block))).astype(np.float32)
    total = 1 + (len(wave) - flen) // shift if len(wave) >= flen else 0
    n_slices = max(n_clips, math.ceil(total / tm))
    groups = np.array_split(np.arange(n_slices), n_clips)
    if train:
        picks = [int(g[rng.integers(len(g))]) for g in groups]
    else:
        picks = [int(g[(len(g) + 1) // 2 - 1]) for g in groups]
    out = np.zeros((n_clips, 1, f, tm), np.float32)
    scale = 1.0 / (2.0 * inputs.audio_std)
    for c, s in enumerate(picks):
        a, b = s * tm, min((s + 1) * tm, total)
        if b <= a:
            continue  # a padding slice: stays 0 (the normalized padding value, as VAST)
        fb = kaldi_fbank(wave[a * shift : (b - 1) * shift + flen], sr, f)
        out[c, 0, :, : fb.shape[0]] = ((fb - inputs.audio_mean) * scale).T
    return torch.from_numpy(out)


def decode_audio(
    data: bytes,
    ext: str,
    inputs: InputConfig,
    train: bool,
    rng: np.random.Generator | None = None,
    limits: DecodeLimits | None = None,
) -> torch.Tensor:
    """Encoded audio -> (N, 1, F, Tm) clips (see :func:`audio_clips`)."""
    wave = load_waveform(data, ext, inputs.sample_rate, limits)
    if wave.size == 0:
        raise SkipSample("bad_audio", "no samples")
    try:
        return audio_clips(wave, inputs, train, rng)
    except Exception as e:  # kaldi-native-fbank refuses NaN energies (samples near float32's range)
        raise SkipSample("bad_audio", f"filterbank: {type(e).__name__}: {e}") from None
