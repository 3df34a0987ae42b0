"""AutoAnchor: check how well a model's anchors cover a dataset's boxes and re-fit them when they do not.

The fit is measured with the width/height ratio metric used by the YOLOv5 loss: a label matches an anchor when
neither side differs from the anchor by more than a factor ``thr``. New anchors come from k-means on the
(whitened) label sizes followed by a short genetic refinement of the same metric.

All randomness comes from seeded ``np.random.Generator`` objects, so results depend only on ``seed`` and no global
RNG state is touched.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from models.yolo import check_anchor_order
from utils.general import LOGGER, colorstr
from utils.torch_utils import de_parallel

PREFIX = colorstr("AutoAnchor: ")
MIN_LABEL_PX = 3.0  # labels with both sides below this are too small to shape anchors
MIN_ANCHOR_PX = 2.0  # evolved anchors never shrink below this


def _as_numpy(x) -> np.ndarray:
    """An array-like or tensor (any device or float dtype, bf16 included) as a float64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _ratio_metric(anchors: np.ndarray, wh: np.ndarray) -> np.ndarray:
    """Worst-side size ratio of every label to every anchor, in [0, 1].

    Args:
        anchors: (k, 2) anchor sizes in pixels.
        wh: (n, 2) label sizes in pixels.

    Returns:
        (n, k) array; 1 means identical size, 1/4 means one side is 4x off.
    """
    with np.errstate(divide="ignore", invalid="ignore"):  # zero-sized boxes/anchors give 0 or inf, never a match
        r = wh[:, None, :] / anchors[None, :, :]  # (n, k, 2)
        x = np.minimum(r, 1.0 / r).min(2)  # (n, k)
    return np.nan_to_num(x, nan=0.0, posinf=0.0)


def anchor_metrics(anchors_px, wh, thr: float = 4.0) -> tuple[float, float]:
    """Best possible recall and mean anchors-per-label for a set of anchors.

    Args:
        anchors_px: (k, 2) anchor sizes in pixels (array or tensor; any leading dims are flattened).
        wh: (n, 2) label sizes in pixels, n >= 1.
        thr: largest allowed size ratio between a label and its anchor (hyp 'anchor_t').

    Returns:
        (bpr, aat): fraction of labels matched by at least one anchor, and mean number of matching anchors
        per label.
    """
    anchors, wh = _as_numpy(anchors_px).reshape(-1, 2), _as_numpy(wh).reshape(-1, 2)
    if len(wh) == 0 or len(anchors) == 0:
        raise ValueError(f"anchor_metrics needs at least one label and one anchor, got {len(wh)} labels and "
                         f"{len(anchors)} anchors; check that the dataset has labels")
    x = _ratio_metric(anchors, wh)
    above = x > 1.0 / thr
    return float(above.any(1).mean()), float(above.sum(1).mean())


def _log_sizes(wh) -> tuple[np.ndarray, np.ndarray]:
    """log width and log height as two contiguous float32 columns (the fitness inner loop works on these)."""
    wh = _as_numpy(wh).reshape(-1, 2)
    with np.errstate(divide="ignore"):  # a zero side becomes -inf and can then never match
        logs = np.log(wh).astype(np.float32)
    return np.ascontiguousarray(logs[:, 0]), np.ascontiguousarray(logs[:, 1])


def _fitness_from_logs(log_w: np.ndarray, log_h: np.ndarray, anchors: np.ndarray, thr: float) -> float:
    """anchor_fitness on precomputed label logs.

    The ratio metric min(r, 1/r) equals exp(-|log r|), so the best anchor of a label is the one with the smallest
    worst-side log gap. Looping over the few anchors with preallocated (n,) buffers keeps one evolution step
    cheap even for ~1M labels.
    """
    log_w_a, log_h_a = _log_sizes(anchors)
    gap = np.full(log_w.shape, np.inf, dtype=np.float32)  # (n,) smallest worst-side |log ratio| so far
    tmp_w, tmp_h = np.empty_like(gap), np.empty_like(gap)
    with np.errstate(invalid="ignore"):  # inf - inf (zero-sized label and anchor) is nan, which never wins
        for aw, ah in zip(log_w_a, log_h_a):
            np.abs(np.subtract(log_w, aw, out=tmp_w), out=tmp_w)
            np.abs(np.subtract(log_h, ah, out=tmp_h), out=tmp_h)
            np.fmin(gap, np.fmax(tmp_w, tmp_h, out=tmp_w), out=gap)
    best = np.exp(-gap)  # (n,) best ratio metric
    return float((best * (gap < np.log(thr))).mean(dtype=np.float64))


def anchor_fitness(anchors_px, wh, thr: float = 4.0) -> float:
    """Mean over labels of the best ratio metric, counting only labels that some anchor matches.

    Args:
        anchors_px: (k, 2) anchors in pixels. wh: (n, 2) label sizes in pixels. thr: ratio threshold.

    Returns:
        Fitness in [0, 1]; higher is better.
    """
    return _fitness_from_logs(*_log_sizes(wh), _as_numpy(anchors_px).reshape(-1, 2), thr)


def label_wh(dataset, imgsz: int = 640, rng: np.random.Generator | None = None) -> np.ndarray:
    """Label sizes in pixels after letterboxing every image so its long side is ``imgsz``.

    Args:
        dataset: object with ``.shapes`` (N, 2) original image (w, h) and ``.labels``, a list of N arrays
            (n_i, 5) [cls, xc, yc, w, h] with normalised coordinates.
        imgsz: training image size (long side) in pixels.
        rng: when given, every image is further scaled by a random factor in [0.9, 1.1], like scale
            augmentation does in training.

    Returns:
        (sum n_i, 2) float64 array of (w, h) in pixels.
    """
    shapes = _as_numpy(dataset.shapes).reshape(-1, 2)
    labels = list(dataset.labels)
    if len(shapes) != len(labels):
        raise ValueError(f"dataset has {len(shapes)} image shapes but {len(labels)} label arrays; they must "
                         f"match one to one (one (n, 5) array per image, empty if it has no boxes)")
    sizes = imgsz * shapes / shapes.max(1, keepdims=True)  # (N, 2) letterboxed image size
    if rng is not None:
        sizes = sizes * rng.uniform(0.9, 1.1, size=(len(sizes), 1))
    parts = [_as_numpy(lb).reshape(-1, 5)[:, 3:5] * s for s, lb in zip(sizes, labels)]
    return np.concatenate(parts, 0) if parts else np.zeros((0, 2))


def _kmeans_pp_init(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre is drawn with probability proportional to squared distance."""
    centres = np.empty((k, points.shape[1]))
    centres[0] = points[rng.integers(len(points))]
    d2 = ((points - centres[0]) ** 2).sum(1)  # (n,) squared distance to the nearest chosen centre
    for j in range(1, k):
        cum = np.cumsum(d2)
        # searchsorted on the running sum avoids choice(p=...) rejecting probabilities that sum to 1 - eps
        idx = int(np.searchsorted(cum, rng.random() * cum[-1], side="right")) if cum[-1] > 0 else 0
        centres[j] = points[min(idx, len(points) - 1)]
        d2 = np.minimum(d2, ((points - centres[j]) ** 2).sum(1))
    return centres


def _sq_distances(columns: list[np.ndarray], centres: np.ndarray) -> np.ndarray:
    """(n, k) squared Euclidean distances from points given as contiguous per-dimension columns.

    One outer difference per dimension is several times faster than a matmul with inner size 2.
    """
    d2 = np.zeros((len(columns[0]), len(centres)))
    for j, col in enumerate(columns):
        diff = np.subtract.outer(col, centres[:, j])
        d2 += diff * diff
    return d2


def _lloyd(points: np.ndarray, centres: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, float]:
    """Lloyd iterations from the given centres until the distortion improves by less than tol.

    Returns:
        (centres (k, d), distortion = mean Euclidean distance of points to their nearest centre).
    """
    k, dims = centres.shape
    columns = [np.ascontiguousarray(points[:, j]) for j in range(dims)]
    previous = np.inf
    for _ in range(max_iter):
        d2 = _sq_distances(columns, centres)  # (n, k)
        assign = d2.argmin(1)
        distortion = float(np.sqrt(d2[np.arange(len(points)), assign]).mean())
        if previous - distortion < tol:
            break
        previous = distortion
        counts = np.bincount(assign, minlength=k)
        sums = np.stack([np.bincount(assign, weights=col, minlength=k) for col in columns], 1)
        filled = counts > 0
        centres = centres.copy()
        centres[filled] = sums[filled] / counts[filled, None]
        if not filled.all():  # an empty cluster restarts at the worst-served point instead of going to waste
            worst = np.argsort(-d2.min(1))[: int((~filled).sum())]
            centres[~filled] = points[worst]
    return centres, float(np.sqrt(_sq_distances(columns, centres).min(1)).mean())


def kmeans(points, k: int, rng: np.random.Generator, n_init: int = 10, max_iter: int = 100,
           tol: float = 1e-5, restart_sample: int = 20000) -> tuple[np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding, keeping the best of ``n_init`` restarts.

    Args:
        points: (n, d) data; needs at least ``k`` distinct rows.
        k: number of clusters.
        rng: source of randomness (seeding, restarts, subsampling).
        n_init: restarts; the run with the lowest distortion wins.
        max_iter: Lloyd iterations per run. tol: stop once the distortion improves by less than this.
        restart_sample: above this many points the restarts run on a random subset of this size and only the
            winner is refined on all points, so large datasets (COCO has ~860k boxes) take seconds, not minutes.

    Returns:
        (centres (k, d), distortion = mean Euclidean distance of points to their nearest centre).
    """
    points = _as_numpy(points)
    distinct = len(np.unique(points, axis=0))
    if k < 1 or distinct < k:
        raise ValueError(f"k-means needs 1 <= k <= number of distinct points, got k={k} with {distinct} "
                         f"distinct points; ask for fewer clusters or provide more data")
    subset = points
    if len(points) > restart_sample:
        subset = points[rng.choice(len(points), restart_sample, replace=False)]
        if len(np.unique(subset, axis=0)) < k:  # heavily duplicated data: the subset cannot hold k clusters
            subset = points
    best, best_dist = None, np.inf
    for _ in range(max(1, n_init)):
        centres, dist = _lloyd(subset, _kmeans_pp_init(subset, k, rng), max_iter, tol)
        if dist < best_dist:
            best, best_dist = centres, dist
    if subset is not points:
        best, best_dist = _lloyd(points, best, max_iter, tol)
    return best, best_dist


def evolve_anchors(anchors, wh, thr: float = 4.0, gen: int = 1000, rng: np.random.Generator | None = None,
                   verbose: bool = False, mutation_prob: float = 0.9, sigma: float = 0.1) -> np.ndarray:
    """Hill-climb anchors with random multiplicative mutations, keeping a mutant only if it is fitter.

    Args:
        anchors: (k, 2) starting anchors in pixels.
        wh: (n, 2) label sizes in pixels that the fitness is measured on.
        thr: ratio threshold of the fitness. gen: number of mutation rounds.
        rng: randomness source (a fresh ``default_rng(0)`` when None).
        verbose: show a tqdm bar with the running fitness.
        mutation_prob: chance that each coordinate mutates. sigma: relative size of a mutation.

    Returns:
        (k, 2) evolved anchors in pixels, each side >= 2 px; fitness is never lower than the start's.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    k = _as_numpy(anchors).reshape(-1, 2).copy()
    log_w, log_h = _log_sizes(wh)  # computed once; each step only compares against the mutated anchors
    fit = _fitness_from_logs(log_w, log_h, k, thr)
    bar = tqdm(range(gen), desc=f"{PREFIX}Evolving anchors", disable=not verbose)
    for _ in bar:
        v = np.ones_like(k)
        while (v == 1).all():  # redraw until at least one coordinate actually changes
            mutate = rng.random(k.shape) < mutation_prob
            v = (mutate * rng.random() * rng.standard_normal(k.shape) * sigma + 1).clip(0.3, 3.0)
        candidate = (k * v).clip(min=MIN_ANCHOR_PX)
        candidate_fit = _fitness_from_logs(log_w, log_h, candidate, thr)
        if candidate_fit > fit:
            k, fit = candidate, candidate_fit
            bar.set_description(f"{PREFIX}Evolving anchors: fitness = {fit:.4f}")
    return k


def _labels_px(wh_or_dataset, img_size: int) -> np.ndarray:
    """(n, 2) label sizes in pixels from a dataset-like object or from an (n, 2) array."""
    if hasattr(wh_or_dataset, "shapes") and hasattr(wh_or_dataset, "labels"):
        return label_wh(wh_or_dataset, img_size)
    wh = _as_numpy(wh_or_dataset)
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"kmean_anchors expects a dataset with .shapes/.labels or an (n, 2) array of label "
                         f"sizes in pixels, got an array of shape {wh.shape}")
    return wh


def _initial_anchors(wh: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n starting anchors (pixels) from k-means on std-whitened sizes, padded at random if data runs short."""
    s = wh.std(0)
    s[s == 0] = 1.0  # all labels share a side length: nothing to whiten on that axis
    distinct = np.unique(wh / s, axis=0)
    if len(distinct) >= n:
        centres, _ = kmeans(wh / s, n, rng)
        return centres * s
    LOGGER.warning(f"{PREFIX}WARNING: only {len(distinct)} distinct label sizes for {n} anchors, too few for "
                   f"k-means; the other {n - len(distinct)} anchors start at random sizes within the label "
                   f"range and rely on evolution. Add labels or use fewer anchors for a better fit")
    extra = rng.uniform(wh.min(0), wh.max(0), size=(n - len(distinct), 2))
    return np.concatenate([distinct * s, extra], 0)


def _fit_report(k: np.ndarray, wh: np.ndarray, thr: float, img_size: int) -> str:
    """One readable summary of how anchors k fit labels wh."""
    x = _ratio_metric(k, wh)  # (n, k)
    best = x.max(1)
    bpr, aat = (best > 1 / thr).mean(), (x > 1 / thr).sum(1).mean()
    past = x[x > 1 / thr]
    sizes = ", ".join(f"{round(w)},{round(h)}" for w, h in k)
    return (f"{PREFIX}thr={1 / thr:.2f}: {bpr:.4f} best possible recall, {aat:.2f} anchors past thr; "
            f"n={len(k)}, img_size={img_size}, metric_all={x.mean():.3f}/{best.mean():.3f}-mean/best, "
            f"past_thr={past.mean() if past.size else 0.0:.3f}-mean: {sizes}")


def kmean_anchors(wh_or_dataset, n: int = 9, img_size: int = 640, thr: float = 4.0, gen: int = 1000,
                  seed: int = 0, verbose: bool = False) -> np.ndarray:
    """Fit n anchors to a dataset's boxes: k-means on whitened sizes, then genetic refinement.

    Args:
        wh_or_dataset: dataset with ``.shapes``/``.labels`` (see ``label_wh``) or an (m, 2) array of label
            sizes in pixels.
        n: number of anchors (nl * na for a model).
        img_size: training image size; dataset boxes are scaled so each image's long side is this.
        thr: ratio threshold (hyp 'anchor_t'). gen: evolution rounds (0 keeps the k-means result).
        seed: seeds a private np.random.Generator; the global RNGs are not touched.
        verbose: log the k-means result too and show a progress bar during evolution.

    Returns:
        (n, 2) float64 anchors in pixels, sorted by area (smallest first).
    """
    rng = np.random.default_rng(seed)
    wh0 = _labels_px(wh_or_dataset, img_size)
    tiny = int((wh0 < MIN_LABEL_PX).any(1).sum())
    if tiny:
        LOGGER.warning(f"{PREFIX}WARNING: {tiny} of {len(wh0)} labels are under {MIN_LABEL_PX:g} pixels on a side; "
                       f"check the labels or train at a larger --imgsz")
    wh = wh0[(wh0 >= MIN_LABEL_PX).any(1)]  # boxes tiny on both sides are left out of the fit
    if len(wh) == 0:
        raise ValueError(f"no labels of at least {MIN_LABEL_PX:g} pixels to fit anchors to (got {len(wh0)} "
                         f"labels at img_size={img_size}); check the dataset labels or pass anchors in the model YAML")
    LOGGER.info(f"{PREFIX}Running k-means for {n} anchors on {len(wh)} points...")
    k = _initial_anchors(wh, n, rng)
    if verbose:
        LOGGER.info(_fit_report(k[np.argsort(k.prod(1))], wh0, thr, img_size))
    k = evolve_anchors(k, wh, thr=thr, gen=gen, rng=rng, verbose=verbose)
    k = k[np.argsort(k.prod(1), kind="stable")]
    LOGGER.info(_fit_report(k, wh0, thr, img_size))
    return k


def check_anchors(dataset, model, thr: float = 4.0, imgsz: int = 640, seed: int = 0) -> bool:
    """Check the model's anchors against the dataset and replace them in place when k-means does better.

    Args:
        dataset: object with ``.shapes`` (N, 2) image (w, h) and ``.labels`` (list of (n, 5) normalised arrays).
        model: a Model, possibly wrapped in DP/DDP; its last layer is the Detect head.
        thr: ratio threshold (hyp 'anchor_t'). imgsz: training image size.
        seed: seeds the random scale augmentation of label sizes and the anchor fit.

    Returns:
        True when new anchors were written into ``Detect.anchors`` (grid units), False otherwise.
    """
    m = de_parallel(model).model[-1]
    if not hasattr(m, "anchors") or getattr(m, "stride", None) is None:
        raise TypeError(f"check_anchors expects a model whose last layer is a built Detect head, got "
                        f"{type(m).__name__}; pass the detection Model (not a backbone)")
    wh = label_wh(dataset, imgsz, rng=np.random.default_rng(seed))
    if len(wh) == 0:
        LOGGER.warning(f"{PREFIX}WARNING: the dataset has no labels, skipping the anchor check")
        return False
    stride = m.stride.to(m.anchors.device).view(-1, 1, 1)  # (nl, 1, 1)
    bpr, aat = anchor_metrics(m.anchors.detach() * stride, wh, thr)
    message = f"{PREFIX}{aat:.2f} anchors/target, {bpr:.3f} Best Possible Recall (BPR). "
    if bpr > 0.98:
        LOGGER.info(message + "Current anchors are a good fit to dataset")
        return False
    LOGGER.info(message + "Anchors are a poor fit to dataset, attempting to improve...")
    try:
        new = kmean_anchors(dataset, n=m.anchors.numel() // 2, img_size=imgsz, thr=thr, gen=1000, seed=seed)
    except ValueError as e:
        LOGGER.warning(f"{PREFIX}WARNING: could not fit new anchors ({e}); keeping the original anchors")
        return False
    new_bpr, _ = anchor_metrics(new, wh, thr)
    if new_bpr <= bpr:
        LOGGER.info(f"{PREFIX}Original anchors better than new anchors ({bpr:.4f} vs {new_bpr:.4f} BPR), "
                    f"keeping the original anchors")
        return False
    with torch.no_grad():
        # check_anchor_order compares areas across levels, which only makes sense in pixels: order first
        m.anchors[:] = torch.as_tensor(new, dtype=m.anchors.dtype, device=m.anchors.device).view_as(m.anchors)
        check_anchor_order(m)
        m.anchors /= stride.to(m.anchors.dtype)
    m.grid = [torch.zeros(1)] * m.nl  # drop cached pixel anchor grids so the next eval forward rebuilds them
    m.anchor_grid = [torch.zeros(1)] * m.nl
    LOGGER.info(f"{PREFIX}New anchors saved to model ({new_bpr:.4f} BPR). "
                f"Update the model *.yaml to use these anchors in the future.")
    return True
