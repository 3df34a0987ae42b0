"""Tests for utils/kd/adapters.py."""
import pytest
import torch
import torch.nn as nn

from utils.kd.adapters import ChannelAdapter, adapt, build_adapters
from utils.kd.losses import mimic_loss


def test_adapters_only_where_channels_differ():
    adapters = build_adapters([16, 32, 64], [16, 48, 64])
    assert list(adapters.keys()) == ["1"]
    conv = adapters["1"].conv
    assert conv.weight.shape == (48, 32, 1, 1) and conv.bias is None
    assert isinstance(adapters["1"].bn, nn.BatchNorm2d) and adapters["1"].bn.num_features == 48
    n_params = sum(p.numel() for p in adapters.parameters())
    assert n_params == 48 * 32 + 2 * 48  # conv weight + BN affine: nothing for the equal pairs


def test_no_adapters_when_not_needed_or_all_equal():
    assert len(build_adapters([16, 32], [24, 48], needed=False)) == 0
    assert len(build_adapters([16, 32], [16, 32])) == 0


def test_adapters_only_at_the_pairs_flagged_as_needing_one():
    adapters = build_adapters([16, 32, 64], [24, 48, 96], needed=[False, True, True])
    assert list(adapters.keys()) == ["1", "2"]  # keys stay the pair index, so adapt(adapters, i, x) finds them
    assert adapters["2"].conv.weight.shape == (96, 64, 1, 1)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="one count per layer pair"):
        build_adapters([16, 32], [16])
    with pytest.raises(ValueError, match="2 flags for 3 layer pairs"):
        build_adapters([16, 32, 64], [24, 48, 96], needed=[True, True])


def test_adapt_applies_or_passes_through():
    adapters = build_adapters([8, 4], [8, 6])
    x0, x1 = torch.rand(2, 8, 3, 3), torch.rand(2, 4, 3, 3)
    assert adapt(adapters, 0, x0) is x0
    assert adapt(adapters, 1, x1).shape == (2, 6, 3, 3)


def test_adapter_parameters_get_gradients():
    adapters = build_adapters([4], [6])
    s = torch.rand(2, 4, 5, 5, requires_grad=True)
    t = torch.rand(2, 6, 5, 5)
    mimic_loss(adapt(adapters, 0, s), t).backward()
    for p in adapters.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_channel_adapter_output_is_normalised_in_train_mode():
    adapter = ChannelAdapter(4, 8).train()
    y = adapter(torch.randn(4, 4, 6, 6) * 5 + 3)
    per_channel = y.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(8), atol=1e-5)
    assert torch.allclose(per_channel.var(1, unbiased=False), torch.ones(8), atol=1e-2)
