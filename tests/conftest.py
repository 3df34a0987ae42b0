"""Shared fixtures: a tiny synthetic dataset and tiny model configs, built once per test session."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from utils.general import yaml_load, yaml_save

ROOT = Path(__file__).resolve().parents[1]
SHAPES_NAMES = None  # read from data/shapes.yaml by the fixture


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny test tensors gain nothing from intra-op threads, and oversubscribed cores slow them down badly."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it (random inits can be degenerate, e.g.
    all ReLUs of a small layer dead; a seed makes such a case fail always or never, not by test order)."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _logger_reaches_caplog():
    """train.main() calls set_logging(), which stops LOGGER from propagating (and may raise its level); undo that
    before every test so caplog sees the package's messages whatever ran before."""
    from utils.general import LOGGER

    LOGGER.propagate = True
    LOGGER.setLevel(logging.INFO)


def tiny_model_cfg(nc: int, width: float = 0.125, depth: float = 0.33, base: str = "yolov5n.yaml") -> dict:
    """A v6.0 model dict with small width/depth multiples (plumbing tests only)."""
    d = yaml_load(ROOT / "models" / base)
    d.update(nc=nc, width_multiple=width, depth_multiple=depth)
    return d


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """A small copy of the bundled synthetic dataset (24 train / 8 val images of 96 px) and its YAML."""
    from utils.synthetic import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root / "shapes", n_train=24, n_val=8, img_size=96, difficulty=0.3, seed=0)
    names = yaml_load(ROOT / "data" / "shapes.yaml")["names"]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    data = {"path": str(root / "shapes"), "train": "images/train", "val": "images/val", "nc": len(names),
            "names": names}
    yaml_save(root / "shapes.yaml", data)
    return root / "shapes.yaml"


@pytest.fixture(scope="session")
def tiny_cfgs(tmp_path_factory, shapes_data) -> dict:
    """YAML files of a tiny student (width 0.125) and a slightly wider teacher (0.25) for the shapes classes."""
    nc = yaml_load(shapes_data)["nc"]
    root = tmp_path_factory.mktemp("cfg")
    paths = {}
    for name, width in (("student", 0.125), ("teacher", 0.25)):
        paths[name] = root / f"{name}.yaml"
        yaml_save(paths[name], tiny_model_cfg(nc, width))
    return paths
