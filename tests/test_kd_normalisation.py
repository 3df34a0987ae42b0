"""The training normalisation of the KD losses (utils.kd.losses.size_free, output_kd_terms(reduction='detection'),
Distiller's mean over pairs and DistillationTask's weighting): checked against hand formulas and against the
property it exists for, a term whose size does not move with the image size or the number of layer pairs."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from utils.kd.distiller import Distiller, KDConfig
from utils.kd.losses import (FEATURE_LOSSES, LOSS_WEIGHTS, at_loss, ft_loss, mimic_loss, output_kd_terms, pkd_loss,
                             size_free)
from utils.kd.pairing import LayerPair
from utils.loss import scale_hyp_gains


def _upsample(x, k):
    """The same 'scene' at k times the resolution: every position repeated k x k times."""
    return F.interpolate(x, scale_factor=k, mode="nearest")


def test_at_size_free_is_the_squared_distance_of_unit_maps_per_image():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 7, 5, 6, generator=g)
    expected = 0.0
    for i in range(3):  # by hand: attention = channel mean of x^2, made a unit vector over the 30 positions
        a = [sum(float(s[i, c, y, x]) ** 2 for c in range(4)) / 4 for y in range(5) for x in range(6)]
        b = [sum(float(t[i, c, y, x]) ** 2 for c in range(7)) / 7 for y in range(5) for x in range(6)]
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        expected += sum((u / na - v / nb) ** 2 for u, v in zip(a, b)) / 3
    got = size_free("at", at_loss(s, t), t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert 0 <= got.item() <= 2


@pytest.mark.parametrize("name", ["at", "at_masked"])
def test_attention_losses_do_not_shrink_with_image_size(name):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 8, 8, generator=g)
    mask = (torch.rand(2, 8, 8, generator=g) > 0.5).float()

    def both(k):
        args = (_upsample(s, k), _upsample(t, k))
        if name == "at_masked":
            args += (_upsample(mask[:, None], k)[:, 0],)
        plain = FEATURE_LOSSES[name](*args)
        return plain.item(), size_free(name, plain, args[1]).item()

    (plain1, free1), (plain5, free5) = both(1), both(5)
    assert plain5 == pytest.approx(plain1 / 25, rel=1e-4), "the plain loss falls with the area (why we normalise)"
    assert free5 == pytest.approx(free1, rel=1e-4)


def test_ft_size_free_is_the_squared_distance_over_channels():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    a = F.normalize(s.pow(2).mean((2, 3)))
    b = F.normalize(t.pow(2).mean((2, 3)))
    expected = (a - b).pow(2).sum(1).mean()
    assert size_free("ft", ft_loss(s, t), t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mimic_size_free_is_a_relative_error():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g) * 3 + 1
    expected = sum(((s[i] - t[i]) ** 2).mean() / ((s[i] ** 2).mean() + (t[i] ** 2).mean()) for i in range(2)) / 2
    got = size_free("mimic", mimic_loss(s, t), t, s)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    scaled = size_free("mimic", mimic_loss(s * 1000, t * 1000), t * 1000, s * 1000)  # activation scale drops out
    assert scaled.item() == pytest.approx(got.item(), rel=1e-4)
    zero = size_free("mimic", mimic_loss(torch.zeros_like(t), t), t, torch.zeros_like(t))
    assert zero.item() == pytest.approx(1.0, rel=1e-6)
    tiny_teacher = t * 1e-12  # a near-zero teacher layer: bounded, not exploding
    assert size_free("mimic", mimic_loss(s, tiny_teacher), tiny_teacher, s).item() == pytest.approx(1.0, rel=1e-5)


def test_cwd_and_pkd_are_left_as_they_are():
    value = torch.tensor(0.37)
    t = torch.randn(1, 2, 3, 3)
    assert size_free("cwd", value, t) is value and size_free("pkd", value, t) is value


def _pairs(n, channels=(4, 6), stride=8):
    return [LayerPair(f"model.{i}", f"model.{i}", channels[0], channels[1], stride) for i in range(n)]


@pytest.mark.parametrize("name", ["at", "cwd", "mimic", "pkd", "mgd"])
def test_feature_term_is_a_mean_over_pairs(name):
    """One pair, and the same pair three times, give the same feature term: the size-free loss of that pair."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 6, 6, 6, generator=g)
    adapted = torch.randn(2, 6, 6, 6, generator=g)  # what KDStudent's adapter would have made of s
    cfg = KDConfig(feat_losses=(name,))
    targets = torch.zeros(0, 6)
    single = Distiller(_pairs(1), cfg).feature_loss([(s, adapted)], [t], targets)
    repeated = Distiller(_pairs(3), cfg).feature_loss([(s, adapted)] * 3, [t] * 3, targets)
    student = s if name == "at" else adapted
    expected = LOSS_WEIGHTS[name] * size_free(name, FEATURE_LOSSES[name](student, t), t, student)
    assert single.item() == pytest.approx(expected.item(), rel=1e-5)
    assert repeated.item() == pytest.approx(single.item(), rel=1e-5)


def test_attention_keeps_every_pair_beside_a_channel_loss():
    """at + cwd: at averaged over all pairs, cwd over the pairs named in channel_names only, and adapters built
    for those pairs alone."""
    g = torch.Generator().manual_seed(5)
    shapes = [(4, 6, 8), (4, 6, 4), (8, 12, 4)]  # (c_s, c_t, h = w) per pair; the first one is a backbone pair
    s = [torch.randn(2, c, h, h, generator=g) for c, _, h in shapes]
    t = [torch.randn(2, c, h, h, generator=g) for _, c, h in shapes]
    adapted = [torch.randn(2, c, h, h, generator=g) for _, c, h in shapes]
    pairs = [LayerPair(f"model.{i}", f"model.{i}", cs, ct, 8) for i, (cs, ct, _) in enumerate(shapes)]
    distiller = Distiller(pairs, KDConfig(feat_losses=("at", "cwd")), channel_names={"model.1", "model.2"})
    assert sorted(distiller.adapters.keys()) == ["1", "2"]
    got = distiller.feature_loss(list(zip(s, adapted)), t, torch.zeros(0, 6))
    # by hand: at is the squared distance of the unit attention maps per image, averaged over images, then pairs
    at_terms = [(at_map(a) - at_map(b)).square().sum(1).mean().item() for a, b in zip(s, t)]
    cwd_terms = []
    for a, b in zip(adapted[1:], t[1:]):  # KL(teacher || student) of each channel's spatial softmax, per (image, channel)
        p_t, log_s = F.softmax(b.flatten(2), -1), F.log_softmax(a.flatten(2), -1)
        cwd_terms.append((p_t * (p_t.log() - log_s)).sum(-1).mean().item())
    expected = LOSS_WEIGHTS["at"] * sum(at_terms) / 3 + LOSS_WEIGHTS["cwd"] * sum(cwd_terms) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["mimic", "mgd"])
def test_distiller_does_not_compute_the_plain_mse_it_would_discard(name):
    """mimic's and mgd's size-free form (the relative error per image) comes from the maps alone, so the Distiller
    must not also run the plain MSE."""
    g = torch.Generator().manual_seed(6)
    s, t, adapted = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 6, 6, 6, generator=g), torch.randn(
        2, 6, 6, 6, generator=g)
    distiller = Distiller(_pairs(1), KDConfig(feat_losses=(name,)))

    def plain_mse_called(*args, **kwargs):
        raise AssertionError(f"plain {name} loss computed")

    distiller.losses = [(name, plain_mse_called) for name, _ in distiller.losses]
    got = distiller.feature_loss([(s, adapted)], [t], torch.zeros(0, 6))
    expected = ((adapted - t).square().mean((1, 2, 3)) / (t.square().mean((1, 2, 3)) +
                                                          adapted.square().mean((1, 2, 3)))).mean()
    assert got.item() == pytest.approx(LOSS_WEIGHTS[name] * expected.item(), rel=1e-5)


def test_each_feature_loss_enters_with_its_weight(monkeypatch):
    """The feature term is the sum of weight x size-free loss; a weight of 1 gives the loss itself."""
    assert set(LOSS_WEIGHTS) == set(FEATURE_LOSSES), "every feature loss needs a weight (the Distiller looks it up)"
    import utils.kd.distiller as distiller_module

    g = torch.Generator().manual_seed(7)
    s, t, adapted = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 6, 6, 6, generator=g), torch.randn(
        2, 6, 6, 6, generator=g)
    args = ([(s, adapted)], [t], torch.zeros(0, 6))
    unit_at = ((at_map(s) - at_map(t)).square().sum(1)).mean()  # squared distance of the unit maps per image
    weights = {**LOSS_WEIGHTS, "at": 0.5, "pkd": 0.3}
    monkeypatch.setattr(distiller_module, "LOSS_WEIGHTS", weights)
    got = Distiller(_pairs(1), KDConfig(feat_losses=("at", "pkd"))).feature_loss(*args)
    assert got.item() == pytest.approx(0.5 * unit_at.item() + 0.3 * pkd_loss(adapted, t).item(), rel=1e-5)
    monkeypatch.setattr(distiller_module, "LOSS_WEIGHTS", {**weights, "pkd": 1.0})
    got = Distiller(_pairs(1), KDConfig(feat_losses=("pkd",))).feature_loss(*args)
    assert got.item() == pytest.approx(pkd_loss(adapted, t).item(), rel=1e-5)


def at_map(x):
    """Attention map by hand: mean of squared channels, flattened and scaled to unit length per image."""
    a = x.square().mean(1).flatten(1)
    return a / a.norm(dim=1, keepdim=True)


def _level(bs, n, nc, g, background):
    """(bs, 3, n, n, 5 + nc) raw maps; cells outside the top-left 2x2 get objectness logit `background`."""
    x = torch.randn(bs, 3, n, n, 5 + nc, generator=g)
    x[:, :, 2:, :, 4] = background
    x[:, :, :, 2:, 4] = background
    return x


def test_detection_reduction_divides_box_and_cls_by_the_objectness_mass():
    g = torch.Generator().manual_seed(5)
    s, t = [_level(2, 4, 3, g, 0.0)], [_level(2, 4, 3, g, 0.0)]
    w = torch.sigmoid(t[0][..., 4])
    box, obj, cls = output_kd_terms(s, t, kind="l2", reduction="detection")
    expected_box = expected_cls = 0.0
    for i in range(2):  # per image: weighted errors over that image's objectness mass (at least 1), then the mean
        mass = max(w[i].sum().item(), 1.0)
        expected_box += ((s[0][i, ..., :4] - t[0][i, ..., :4]) ** 2 * w[i, ..., None]).sum().item() / (mass * 4) / 2
        expected_cls += ((s[0][i, ..., 5:] - t[0][i, ..., 5:]) ** 2 * w[i, ..., None]).sum().item() / (mass * 3) / 2
    assert box.item() == pytest.approx(expected_box, rel=1e-5)
    assert cls.item() == pytest.approx(expected_cls, rel=1e-5)
    assert obj.item() == pytest.approx(((s[0][..., 4] - t[0][..., 4]) ** 2 * w).mean().item(), rel=1e-5)
    plain = output_kd_terms(s, t, kind="l2")
    assert plain[1].item() == pytest.approx(obj.item(), rel=1e-6), "obj is reduced as in the original formula"


@pytest.mark.parametrize("reduction", ["mean", "detection"])
def test_batch_term_is_the_mean_of_per_image_terms(reduction):
    """What DDP needs: processes holding different images of a batch add up to the whole batch's loss."""
    g = torch.Generator().manual_seed(7)
    s = [torch.randn(4, 3, n, n, 8, generator=g) for n in (4, 2)]
    t = [torch.randn(4, 3, n, n, 8, generator=g) * 3 for n in (4, 2)]
    whole = torch.stack(output_kd_terms(s, t, reduction=reduction))
    halves = [torch.stack(output_kd_terms([x[i:i + 2] for x in s], [x[i:i + 2] for x in t], reduction=reduction))
              for i in (0, 2)]
    torch.testing.assert_close(whole, (halves[0] + halves[1]) / 2, rtol=1e-5, atol=0)
    mimic = size_free("mimic", None, t[0][..., 0], s[0][..., 0])
    mimic_halves = [size_free("mimic", None, t[0][i:i + 2, ..., 0], s[0][i:i + 2, ..., 0]) for i in (0, 2)]
    torch.testing.assert_close(mimic, (mimic_halves[0] + mimic_halves[1]) / 2, rtol=1e-5, atol=0)


def test_detection_reduction_box_and_cls_do_not_shrink_with_more_background_cells():
    """The same objects on a grid with 16x the cells: 'mean' falls ~16x, 'detection' box/cls stay put."""
    g = torch.Generator().manual_seed(6)
    small_s, small_t = _level(2, 4, 3, g, -30.0), _level(2, 4, 3, g, -30.0)
    big_s, big_t = torch.zeros(2, 3, 16, 16, 8), torch.full((2, 3, 16, 16, 8), 0.0)
    big_t[..., 4] = -30.0  # background: the teacher sees nothing there
    big_s[:, :, :4, :4], big_t[:, :, :4, :4] = small_s, small_t
    for reduction, expect_ratio in (("detection", 1.0), ("mean", 16.0)):
        small = output_kd_terms([small_s], [small_t], reduction=reduction)
        big = output_kd_terms([big_s], [big_t], reduction=reduction)
        for term in (0, 2):  # box, cls
            assert small[term].item() / big[term].item() == pytest.approx(expect_ratio, rel=1e-3)


def test_giou_is_scaled_like_box_and_falls_back_to_box():
    hyp = {"box": 0.05, "obj": 1.0, "cls": 0.5, "giou": 0.2}
    assert scale_hyp_gains(hyp, 4, 80, 640)["giou"] == pytest.approx(0.2 * 3 / 4)
    no_giou = {k: v for k, v in hyp.items() if k != "giou"}
    assert scale_hyp_gains(no_giou, 3, 80, 640)["giou"] == pytest.approx(0.05)


def test_kd_obj_and_kd_cls_are_scaled_like_obj_and_cls_and_fall_back_to_them():
    hyp = {"box": 0.05, "obj": 1.0, "cls": 0.5, "kd_obj": 0.3, "kd_cls": 2.0}
    scaled = scale_hyp_gains(hyp, 4, 20, 320)
    assert scaled["kd_obj"] == pytest.approx(0.3 * 0.25 * 0.75)  # (320/640)^2, 3/4 levels
    assert scaled["kd_cls"] == pytest.approx(2.0 * 0.25 * 0.75)  # 20/80 classes, 3/4 levels
    plain = scale_hyp_gains({"box": 0.05, "obj": 1.0, "cls": 0.5}, 4, 20, 320)
    assert plain["kd_obj"] == plain["obj"] and plain["kd_cls"] == plain["cls"]


def test_kd_obj_and_kd_cls_gains_weigh_only_their_own_term(tmp_path):
    from tests.test_kd_task import batch, make_task

    task = make_task(feat_losses=("at",), tmp_path=tmp_path)
    task.on_epoch_start(0, 10)
    imgs, targets = batch()

    def kd_items(**gains):
        task.hyp = {**task.hyp, **gains}
        with torch.no_grad():
            return task.train_step(task.trainable, imgs, targets)[1][3:]

    base = kd_items()
    off = kd_items(kd_obj=0.0, kd_cls=task.hyp["cls"] * 3)
    assert off[1] == 0 and base[1] > 0
    torch.testing.assert_close(off[2], base[2] * 3, rtol=1e-4, atol=0)
    torch.testing.assert_close(off[[0, 3]], base[[0, 3]], rtol=1e-4, atol=0)


def test_kd_obj_end_and_kd_cls_end_are_scaled_like_the_gains_they_end():
    hyp = {"box": 0.05, "obj": 1.0, "cls": 0.5, "kd_obj_end": 0.2, "kd_cls_end": 0.4}
    scaled = scale_hyp_gains(hyp, 4, 20, 320)
    assert scaled["kd_obj_end"] == pytest.approx(0.2 * 0.25 * 0.75)
    assert scaled["kd_cls_end"] == pytest.approx(0.4 * 0.25 * 0.75)
    assert "kd_cls_end" not in scale_hyp_gains({"box": 0.05, "obj": 1.0, "cls": 0.5}, 3, 80, 640)


def test_kd_cls_end_and_kd_obj_end_move_their_gain_linearly_over_the_epochs(tmp_path):
    from tests.test_kd_task import batch, make_task

    task = make_task(feat_losses=("at",), tmp_path=tmp_path)
    imgs, targets = batch()
    hyp0 = dict(task.hyp)

    def kd_items(epoch, **gains):
        task.hyp = {**hyp0, **gains}
        task.on_epoch_start(epoch, 5)
        with torch.no_grad():
            return task.train_step(task.trainable, imgs, targets)[1][3:]

    unit = kd_items(0, kd_obj=1.0, kd_cls=1.0)  # the obj and cls terms at gain 1
    assert torch.all(unit[1:3] > 0)
    for epoch, frac in ((0, 0.0), (2, 0.5), (4, 1.0)):
        moved = kd_items(epoch, kd_obj=1.0, kd_obj_end=0.0, kd_cls=1.0, kd_cls_end=0.25)
        torch.testing.assert_close(moved[1], unit[1] * (1.0 - frac), rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(moved[2], unit[2] * (1.0 - 0.75 * frac), rtol=1e-4, atol=0)
        torch.testing.assert_close(moved[[0, 3]], unit[[0, 3]], rtol=1e-4, atol=0)  # box and feature terms stay
    # without an end value the gain stays where it starts
    torch.testing.assert_close(kd_items(4, kd_obj=1.0, kd_cls=1.0), unit, rtol=1e-4, atol=0)


def test_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        output_kd_terms([torch.zeros(1, 3, 2, 2, 8)], [torch.zeros(1, 3, 2, 2, 8)], reduction="sum")


def test_hyp_kd_scales_every_kd_term_and_alpha_beta_their_own(tmp_path):
    from dataclasses import replace

    from tests.test_kd_task import batch, make_task

    task = make_task(feat_losses=("at",), tmp_path=tmp_path)
    task.on_epoch_start(0, 10)
    imgs, targets = batch()

    def kd_items(kd=1.0, alpha=1.0, beta=1.0):
        task.hyp = {**task.hyp, "kd": kd}
        task.cfg = replace(task.cfg, alpha=alpha, beta=beta)
        torch.manual_seed(0)
        with torch.no_grad():
            return task.train_step(task.trainable, imgs, targets)[1][3:]

    base = kd_items()
    assert torch.all(base > 0)
    torch.testing.assert_close(kd_items(kd=2.0), base * 2, rtol=1e-4, atol=0)
    alpha = kd_items(alpha=3.0)
    torch.testing.assert_close(alpha[:3], base[:3] * 3, rtol=1e-4, atol=0)
    torch.testing.assert_close(alpha[3], base[3], rtol=1e-4, atol=0)
    beta = kd_items(beta=0.5)
    torch.testing.assert_close(beta[:3], base[:3], rtol=1e-4, atol=0)
    torch.testing.assert_close(beta[3], base[3] * 0.5, rtol=1e-4, atol=0)
