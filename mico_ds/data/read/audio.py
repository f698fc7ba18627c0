"""Decoding of audio members: mono waveform at ``inputs.sample_rate``, Kaldi log-mel filterbank, clips.

audio   (N, 1, F, Tm)    soundfile (flac/wav) or PyAV (mp3 & co), mono, resampled with PyAV's
                         AudioResampler (libswresample) to inputs.sample_rate, Kaldi log-mel
                         filterbank (kaldi-native-fbank, the torchaudio.compliance.kaldi.fbank
                         settings of MiCo/VAST/AST), normalized (fbank - mean) / (2 std), cut into
                         N clips of Tm frames
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from mico_ds.config import InputConfig
from mico_ds.data.read.skips import SkipSample

# Kaldi frame geometry used by MiCo's audio processor (torchaudio.compliance.kaldi.fbank defaults).
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
# One int16 LSB on a [-1, 1] waveform: Kaldi's default dither (1.0 on int16 samples), applied only in
# training, from the per-sample generator (kaldi-native-fbank's own dither RNG is not seedable).
TRAIN_DITHER = 1.0 / 32768.0


# ----------------------------------------------------------------------------- audio


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 waveform at ``rate`` -> ``target`` Hz with PyAV's AudioResampler (libswresample)."""
    if rate == target:
        return wave
    import av

    arr = np.ascontiguousarray(wave, dtype=np.float32)[None]  # (channels=1, samples), packed
    frame = av.AudioFrame.from_ndarray(arr, format="flt", layout="mono")
    frame.sample_rate = rate
    rs = av.AudioResampler(format="flt", layout="mono", rate=target)
    out = [f.to_ndarray()[0] for f in rs.resample(frame)]
    out += [f.to_ndarray()[0] for f in rs.resample(None)]  # flush the filter's delay line
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def load_waveform(data: bytes, ext: str, sample_rate: int) -> np.ndarray:
    """Encoded audio -> mono float32 in [-1, 1] at ``sample_rate`` (soundfile for flac/wav, else PyAV)."""
    if not data:
        raise SkipSample("bad_audio", "empty member")
    try:
        if ext in ("flac", "wav"):
            import soundfile as sf

            wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
            return resample(wave.mean(axis=1), int(rate), sample_rate)
        import av

        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise SkipSample("bad_audio", "no audio stream")
            stream = container.streams.audio[0]
            rs = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks = []
            for frame in container.decode(stream):
                chunks += [f.to_ndarray()[0] for f in rs.resample(frame)]
            chunks += [f.to_ndarray()[0] for f in rs.resample(None)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    except SkipSample:
        raise
    except Exception as e:
        raise SkipSample("bad_audio", f"{type(e).__name__}: {e}") from None


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
    wave = wave - wave.mean() if wave.size else wave  # AST/VAST remove the waveform's DC first
    if train:
        if rng is None:
            raise ValueError("training-mode decoding needs a per-sample generator (rng)")
        wave = wave + (TRAIN_DITHER * rng.standard_normal(wave.shape)).astype(np.float32)
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
    data: bytes, ext: str, inputs: InputConfig, train: bool, rng: np.random.Generator | None = None
) -> torch.Tensor:
    """Encoded audio -> (N, 1, F, Tm) clips (see :func:`audio_clips`)."""
    wave = load_waveform(data, ext, inputs.sample_rate)
    if wave.size == 0:
        raise SkipSample("bad_audio", "no samples")
    return audio_clips(wave, inputs, train, rng)
