"""Tests for utils/kd/adapters.py."""
import pytest
import torch
import torch.nn as nn

from utils.kd.adapters import ChannelAdapter, GenerativeAdapter, adapt, build_adapters
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


def test_generative_adapters_at_every_needed_pair_equal_counts_included():
    adapters = build_adapters([16, 32, 8], [16, 48, 12], needed=[True, True, False], generative=True)
    assert list(adapters.keys()) == ["0", "1"]
    assert all(isinstance(a, GenerativeAdapter) for a in adapters.values())
    assert isinstance(adapters["0"].align, nn.Identity), "equal counts: no projection before the generator"
    assert isinstance(adapters["1"].align, ChannelAdapter) and adapters["1"].align.conv.weight.shape == (48, 32, 1, 1)
    convs = [m for m in adapters["1"].generate if isinstance(m, nn.Conv2d)]
    assert [c.weight.shape for c in convs] == [(48, 48, 3, 3)] * 2
    assert adapters["1"](torch.rand(2, 32, 5, 7)).shape == (2, 48, 5, 7)


def _generator_input(adapter, x):
    """What the generator's first convolution receives (after alignment and masking)."""
    seen = {}
    hook = adapter.generate[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    adapter(x)
    hook.remove()
    return seen["x"]


def test_generative_adapter_hides_its_share_of_positions_in_training_only():
    torch.manual_seed(0)
    adapter = GenerativeAdapter(6, 6, mask_ratio=0.65)
    x = torch.rand(4, 6, 32, 32) + 1.0  # no zeros of its own
    seen = _generator_input(adapter.train(), x)
    hidden = seen == 0  # (4, 6, 32, 32)
    assert (hidden == hidden[:, :1]).all(), "one mask per image and position, shared by every channel"
    share = hidden[:, 0].float().mean().item()
    assert abs(share - 0.65) < 0.03, f"{share:.3f} of 4096 positions hidden, expected about 0.65"
    masks = hidden[:, 0].flatten(1)
    assert not (masks == masks[:1]).all(), "each image draws its own mask"
    assert torch.equal(seen[~hidden], x[~hidden]), "the positions left visible reach the generator unchanged"
    assert torch.equal(_generator_input(adapter.eval(), x), x), "eval mode: nothing hidden, equal counts: no projection"


def test_generative_adapter_rejects_a_mask_ratio_outside_0_1():
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        GenerativeAdapter(4, 4, mask_ratio=1.0)
