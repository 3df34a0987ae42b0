"""Small helpers shared by every script: logging, paths, YAML files and image-size checks."""
from __future__ import annotations

import glob
import logging
import math
import os
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]  # repository root
LOGGER = logging.getLogger("yolov5")


def set_logging(verbose: bool = True, rank: int = -1) -> None:
    """Configure the package logger once: INFO on rank 0 / single process, WARNING elsewhere."""
    level = logging.INFO if verbose and rank in (-1, 0) else logging.WARNING
    LOGGER.setLevel(level)
    if not LOGGER.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False

_ANSI = {
    "black": "\033[30m", "red": "\033[31m", "green": "\033[32m", "yellow": "\033[33m",
    "blue": "\033[34m", "magenta": "\033[35m", "cyan": "\033[36m", "white": "\033[37m",
    "bold": "\033[1m", "underline": "\033[4m", "end": "\033[0m",
}


def colorstr(*parts: str) -> str:
    """Wrap the last argument in ANSI styles named by the others: colorstr('blue', 'bold', 'text')."""
    *styles, text = parts if len(parts) > 1 else ("blue", "bold", parts[0])
    return "".join(_ANSI[s] for s in styles) + f"{text}" + _ANSI["end"]


def make_divisible(x: float, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is >= x."""
    divisor = int(divisor.max()) if hasattr(divisor, "max") else int(divisor)
    return int(math.ceil(x / divisor) * divisor)


def check_img_size(imgsz, stride: int = 32, floor: int = 0):
    """Round an image size (int or list) up to a multiple of the stride, warning when it changes."""
    if isinstance(imgsz, (list, tuple)):
        new = [max(make_divisible(int(x), stride), floor) for x in imgsz]
    else:
        new = max(make_divisible(int(imgsz), stride), floor)
    if new != imgsz:
        LOGGER.warning(f"WARNING: --imgsz {imgsz} must be a multiple of max stride {stride}, using {new}")
    return new


def increment_path(path, exist_ok: bool = False, sep: str = "", mkdir: bool = False) -> Path:
    """runs/train/exp -> runs/train/exp2, exp3, ... unless exist_ok or the path is free."""
    path = Path(path)
    if path.exists() and not exist_ok:
        stem, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        pattern = re.compile(rf"{re.escape(stem.name)}{re.escape(sep)}(\d+)$")
        taken = [int(m.group(1)) for p in glob.glob(f"{stem}{sep}*") if (m := pattern.search(Path(p).stem))]
        n = max(taken) + 1 if taken else 2
        path = Path(f"{stem}{sep}{n}{suffix}")
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


def yaml_load(file) -> dict:
    """Read a YAML file into a dict (an empty file gives {})."""
    with open(file, errors="ignore") as f:
        return yaml.safe_load(f) or {}


def yaml_save(file, data: dict) -> None:
    """Write plain data to YAML, turning Paths into strings."""
    clean = {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
    with open(file, "w") as f:
        yaml.safe_dump(clean, f, sort_keys=False)


def get_latest_run(search_dir: str = ".") -> str:
    """Most recently written last.pt below search_dir ('' when none)."""
    runs = glob.glob(f"{search_dir}/**/last*.pt", recursive=True)
    return max(runs, key=os.path.getctime) if runs else ""


USER_ERRORS = (FileNotFoundError, ValueError, KeyError)  # expected mistakes: a path, a flag, a YAML key


def run_cli(fn, *args):
    """Call a script's main: expected mistakes (USER_ERRORS) print one 'ERROR: ...' line that says the fix and
    exit with status 1 instead of a traceback. Returns fn's result."""
    try:
        return fn(*args)
    except USER_ERRORS as e:
        message = f"dataset or config YAML has no key {e}; add it" if isinstance(e, KeyError) else str(e)
        LOGGER.error(f"ERROR: {message}")
        sys.exit(1)


def newest_best(search_dir) -> str:
    """The most recently written weights/best.pt below search_dir ('' when there is none)."""
    runs = glob.glob(f"{search_dir}/**/weights/best.pt", recursive=True)
    return max(runs, key=os.path.getmtime) if runs else ""


def default_weights(weights, search_dir) -> list:
    """--weights as a list; when empty, the newest run's best.pt (logged), else a ValueError naming the flag."""
    weights = [w for w in ([weights] if isinstance(weights, (str, Path)) else list(weights or [])) if str(w)]
    if weights:
        return weights
    newest = newest_best(search_dir)
    if not newest:
        raise ValueError(f"no --weights given and no trained model under {search_dir}; pass --weights "
                         f"path/to/best.pt (train one with: python train.py)")
    LOGGER.info(f"no --weights given: using the newest run's {newest}")
    return [newest]


def print_args(name: str, args: dict) -> None:
    """One log line with a script's arguments."""
    LOGGER.info(colorstr(f"{name}: ") + ", ".join(f"{k}={v}" for k, v in args.items()))


def find_file(path) -> Path:
    """A file by path as given, else relative to the repository root (so defaults work from any folder)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    candidate = ROOT / p
    return candidate if candidate.exists() else p
