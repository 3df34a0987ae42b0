"""Live video for detect.py: webcams, stream URLs and .streams lists (one reader thread per source), the optional
cv2.imshow display, and the video writers of annotated output."""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from utils.augmentations import letterbox
from utils.general import LOGGER

STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://")
FALLBACK_FPS = 30.0  # when a source does not report a usable frame rate


def is_stream(source) -> bool:
    """A webcam index ('0'), a stream URL (rtsp/rtmp/http/https) or a .streams file listing sources."""
    text = str(source).strip().lower()
    return text.isnumeric() or text.startswith(STREAM_PREFIXES) or text.endswith(".streams")


def read_sources(source) -> list:
    """A .streams file -> its non-empty, non-comment lines; any other source -> [source]."""
    text = str(source).strip()
    if not text.lower().endswith(".streams"):
        return [text]
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"stream list '{text}' does not exist; pass a file with one source per line")
    lines = [line.strip() for line in path.read_text().splitlines()]
    sources = [line for line in lines if line and not line.startswith("#")]
    if not sources:
        raise ValueError(f"stream list '{text}' is empty; write one webcam index, URL or video path per line")
    return sources


def stream_name(source: str) -> str:
    """A file-name-safe stem for a source's outputs: 'webcam0', the last part of a URL, or a file's stem."""
    if source.isnumeric():
        return f"webcam{source}"
    last = source.rstrip("/").split("/")[-1].split("?")[0]
    stem = Path(last).stem if "." in last else last
    return re.sub(r"[^\w.-]", "_", stem) or "stream"


class LoadStreams:
    """Read live sources on background threads and yield their newest frames together, letterboxed.

    Each source has a reader thread that keeps only its newest frame (a slow model drops frames instead of
    falling behind a live source), paced at the source's frame rate so a video file plays in real time. A batch
    is yielded once every source has a frame not yielded before; iteration stops when a source ends (a file's
    last frame, a closed stream) or sends nothing new for ``timeout`` seconds.

    Args:
        sources: a webcam index ('0'), a URL, a video file, a .streams file, or a list of those.
        img_size: network input size (int or (h, w)). stride: model stride for the rectangular letterbox.
        auto: minimum rectangle when every source has the same frame size (else the full img_size).
        timeout: seconds without a new frame before giving up on a source.

    Yields:
        (sources, im, im0s, None, ''): ``im`` is (n, 3, h, w) RGB uint8, ``im0s`` the n original BGR frames.

    Attributes:
        mode: 'stream'. frame: number of batches yielded. fps: frame rate per source.
    """

    def __init__(self, sources, img_size=640, stride: int = 32, auto: bool = True, timeout: float = 10.0):
        names = [s for src in (sources if isinstance(sources, (list, tuple)) else [sources])
                 for s in read_sources(src)]
        self.sources, self.img_size, self.stride, self.timeout = names, img_size, stride, timeout
        self.mode, self.frame = "stream", 0
        self._cond, self._stop = threading.Condition(), threading.Event()
        self.caps, self.fps, self.frames = [], [], []
        try:
            for i, source in enumerate(names):
                self._open(i, source)
        except Exception:
            self.close()
            raise
        self.counts, self.ended = [1] * len(names), [False] * len(names)  # the first frame came from _open
        shapes = {letterbox(f, img_size, stride=stride, auto=auto)[0].shape for f in self.frames}
        self.auto = auto and len(shapes) == 1  # frames stack into one batch only at one shape
        if auto and not self.auto:
            LOGGER.warning("WARNING: stream frame sizes differ; letterboxing every frame to the full --imgsz")
        self.threads = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(len(names))]
        for t in self.threads:
            t.start()

    def _open(self, i: int, source: str) -> None:
        """Open one source and read its first frame; raise FileNotFoundError with the fix when that fails."""
        cap = cv2.VideoCapture(int(source) if source.isnumeric() else source)
        self.caps.append(cap)
        if not cap.isOpened():
            raise FileNotFoundError(f"cannot open stream source '{source}'; check the webcam index, the URL or the "
                                    f"video path (OpenCV needs a backend that reads it)")
        ok, frame = cap.read()
        if not ok:
            raise FileNotFoundError(f"stream source '{source}' opened but sent no frame; check that it is live")
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps.append(fps if 0 < fps < 1000 else FALLBACK_FPS)
        self.frames.append(frame)
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        LOGGER.info(f"{i + 1}/{len(self.sources)}: {source}... {frame.shape[1]}x{frame.shape[0]} at "
                    f"{self.fps[i]:.1f} FPS ({total if total > 0 else 'live'} frames)")

    def _read(self, i: int) -> None:
        """Reader thread of source i: store each new frame until the source ends or close() is called."""
        cap, period = self.caps[i], 1.0 / self.fps[i]
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                ok, frame = cap.read()
                if not ok:
                    break
                with self._cond:
                    self.frames[i], self.counts[i] = frame, self.counts[i] + 1
                    self._cond.notify_all()
                # a live source blocks in read() until its next frame; only a file needs this wait
                self._stop.wait(max(0.0, period - (time.monotonic() - start)))
        finally:
            with self._cond:
                self.ended[i] = True
                self._cond.notify_all()

    def _next_batch(self, seen: list):
        """The newest frames once every source has a new one; None when a source ended or timed out."""
        def ready():
            fresh = all(c > s for c, s in zip(self.counts, seen))
            return fresh or any(e and c == s for e, c, s in zip(self.ended, self.counts, seen))

        with self._cond:
            if not self._cond.wait_for(ready, timeout=self.timeout):
                stale = [s for s, c, n in zip(self.sources, self.counts, seen) if c == n]
                LOGGER.warning(f"WARNING: no new frame from {', '.join(stale)} in {self.timeout:g}s; stopping")
                return None
            if not all(c > s for c, s in zip(self.counts, seen)):
                return None  # a source ended
            seen[:] = self.counts
            return list(self.frames)

    def __iter__(self):
        seen = [0] * len(self.sources)
        try:
            while (frames := self._next_batch(seen)) is not None:
                self.frame += 1
                ims = [letterbox(f, self.img_size, stride=self.stride, auto=self.auto)[0] for f in frames]
                im = np.ascontiguousarray(np.stack(ims).transpose(0, 3, 1, 2)[:, ::-1])  # BGR HWC -> RGB CHW
                yield self.sources, im, frames, None, ""
        finally:
            self.close()

    def __len__(self) -> int:
        """Number of sources (the batch size); the number of frames is open-ended."""
        return len(self.sources)

    def close(self) -> None:
        """Stop the reader threads and release the captures (also called when iteration ends)."""
        self._stop.set()
        for t in getattr(self, "threads", []):
            t.join(timeout=2.0)
        for cap in self.caps:
            cap.release()


def display_problem() -> str:
    """Why cv2.imshow cannot work here ('' when it can): no display on Linux, or OpenCV without GUI support
    (opencv-python-headless), found by opening a test window once."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (DISPLAY is not set)"
    try:
        cv2.namedWindow("yolov5-kd display check", cv2.WINDOW_NORMAL)
        cv2.destroyWindow("yolov5-kd display check")
    except cv2.error:
        return "this OpenCV build has no GUI support (opencv-python-headless); install opencv-python to view"
    return ""


class Viewer:
    """--view-img: show annotated frames in one window per source, or warn once and show nothing."""

    def __init__(self, enabled: bool):
        problem = display_problem() if enabled else ""
        if problem:
            LOGGER.warning(f"WARNING: --view-img ignored: {problem}; results are still saved")
        self.enabled, self.windows = enabled and not problem, set()

    def show(self, name: str, image: np.ndarray) -> bool:
        """Display image in window ``name``. Returns True when the user pressed 'q' to stop."""
        if not self.enabled:
            return False
        if name not in self.windows:
            cv2.namedWindow(name, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO)
            self.windows.add(name)
        cv2.imshow(name, image)
        return cv2.waitKey(1) & 0xFF == ord("q")

    def close(self) -> None:
        if self.windows:
            cv2.destroyAllWindows()
            self.windows.clear()


class VideoSaver:
    """One cv2.VideoWriter per output slot (a batch position), reopened when the slot's output file changes."""

    def __init__(self):
        self.writers = {}  # slot -> (path, writer)

    def write(self, slot: int, save_path: str, frame: np.ndarray, fps: float) -> None:
        """Append frame (BGR) to save_path (written as .mp4) at fps (30 when unknown)."""
        path, writer = self.writers.get(slot, (None, None))
        if save_path != path:
            if writer is not None:
                writer.release()
            h, w = frame.shape[:2]
            writer = cv2.VideoWriter(str(Path(save_path).with_suffix(".mp4")), cv2.VideoWriter_fourcc(*"mp4v"),
                                     fps if fps and fps > 0 else FALLBACK_FPS, (w, h))
            self.writers[slot] = (save_path, writer)
        writer.write(frame)

    def close(self) -> None:
        for _, writer in self.writers.values():
            writer.release()
        self.writers.clear()
