"""Inference sources: image files, folders, globs and video files, letterboxed for the network."""
from __future__ import annotations

import glob
from pathlib import Path

import cv2
import numpy as np

from utils.augmentations import letterbox
from utils.general import LOGGER

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp")
VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv")


def _expand(path) -> list:
    """One source argument -> sorted list of files. Raises FileNotFoundError naming the missing path."""
    text = str(path)
    if any(ch in text for ch in "*?["):  # a glob pattern
        files = sorted(glob.glob(text, recursive=True))
        if not files:
            raise FileNotFoundError(f"Source glob '{text}' matched no files; check the pattern and folder")
        return [f for f in files if Path(f).is_file()]
    p = Path(text).expanduser()
    if p.is_dir():
        return sorted(str(f) for f in p.iterdir() if f.is_file())
    if p.is_file():
        return [str(p)]
    raise FileNotFoundError(f"Source '{text}' does not exist; pass an image, a video, a folder or a glob "
                            f"like 'dir/*.jpg'")


def _suffix(f: str) -> str:
    return Path(f).suffix[1:].lower()


def read_image(path) -> np.ndarray | None:
    """Decode an image file to BGR uint8 (None when unreadable). Works with non-ASCII paths, unlike cv2.imread."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None


class LoadImages:
    """Iterate over images and video frames, yielding letterboxed network inputs.

    Args:
        path: an image or video file, a folder, a glob ('dir/*.jpg'), or a list of those.
        img_size: network input size (int or (h, w)) passed to letterbox.
        stride: model stride; with ``auto`` the padded shape is the smallest stride multiple.
        auto: minimum-rectangle letterbox (True) or the full img_size square (False).

    Yields:
        (path, im, im0, vid_cap, s): ``im`` is the (3, h, w) RGB contiguous uint8 network input, ``im0`` the
        original BGR image, ``vid_cap`` the cv2.VideoCapture for video frames (None for images) and ``s`` a
        description such as 'image 1/3 /data/a.jpg: '.

    Attributes:
        mode: 'image' or 'video' for the item just yielded; frame/frames: current frame number and frame count.
    """

    def __init__(self, path, img_size=640, stride: int = 32, auto: bool = True):
        sources = path if isinstance(path, (list, tuple)) else [path]
        files = [f for src in sources for f in _expand(src)]
        images = [f for f in files if _suffix(f) in IMG_FORMATS]
        videos = [f for f in files if _suffix(f) in VID_FORMATS]
        if not images and not videos:
            raise FileNotFoundError(f"No images or videos found in {path}; supported image suffixes: "
                                    f"{', '.join(IMG_FORMATS)}; video suffixes: {', '.join(VID_FORMATS)}")
        self.files = images + videos
        self.video_flag = [False] * len(images) + [True] * len(videos)
        self.nf = len(self.files)
        self.img_size, self.stride, self.auto = img_size, stride, auto
        self.mode, self.frame, self.frames, self.cap = "image", 0, 0, None

    def __len__(self) -> int:
        """Number of files (a video counts once)."""
        return self.nf

    def _prepare(self, im0: np.ndarray) -> np.ndarray:
        """BGR HWC image -> letterboxed RGB CHW contiguous uint8."""
        im = letterbox(im0, self.img_size, stride=self.stride, auto=self.auto)[0]
        return np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])

    def _image(self, index: int, path: str):
        """Yield one image item, or warn and yield nothing when the file cannot be decoded."""
        im0 = read_image(path)
        if im0 is None:
            LOGGER.warning(f"WARNING: skipping unreadable image {path} (corrupt file or unsupported encoding)")
            return
        self.mode, self.cap, self.frame, self.frames = "image", None, 0, 0
        yield path, self._prepare(im0), im0, None, f"image {index + 1}/{self.nf} {path}: "

    def _video(self, index: int, path: str):
        """Yield every frame of a video file; warn and skip a file OpenCV cannot open."""
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            LOGGER.warning(f"WARNING: skipping video {path}: OpenCV cannot open it (missing codec or corrupt file)")
            return
        self.mode, self.cap, self.frame = "video", cap, 0
        self.frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        try:
            while True:
                ok, im0 = cap.read()
                if not ok:
                    break
                self.frame += 1
                s = f"video {index + 1}/{self.nf} ({self.frame}/{self.frames}) {path}: "
                yield path, self._prepare(im0), im0, cap, s
        finally:
            cap.release()

    def __iter__(self):
        for index, (path, is_video) in enumerate(zip(self.files, self.video_flag)):
            yield from (self._video if is_video else self._image)(index, path)
