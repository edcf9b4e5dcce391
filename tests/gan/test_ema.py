import pytest
import torch
from torch import nn

from gan.ema import GeneratorEMA


def constant_net(value: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
    return net


def test_warmup_copies_then_decays():
    net = constant_net(0.0)
    ema = GeneratorEMA(net, decay=0.9, warmup_steps=2)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    ema.update(net, step=0)  # warm-up: a copy
    assert all(torch.all(p == 1.0) for p in ema.model.parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(2.0)
    ema.update(net, step=2)  # 0.9 * 1 + 0.1 * 2
    for p in ema.model.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.1))


def test_buffers_are_copied_and_the_copy_is_frozen():
    net = constant_net(0.0)
    ema = GeneratorEMA(net, decay=0.99)
    net.train()(torch.randn(8, 2) * 3 + 5)  # moves the BatchNorm running mean
    ema.update(net, step=10)
    torch.testing.assert_close(ema.model[1].running_mean, net[1].running_mean)
    assert not ema.model.training
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_unwraps_a_ddp_like_wrapper():
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    net = constant_net(1.0)
    ema = GeneratorEMA(Wrapper(net), decay=0.5)
    assert isinstance(ema.model, nn.Sequential)
    with torch.no_grad():
        net[0].weight.fill_(3.0)
    ema.update(Wrapper(net), step=5)
    torch.testing.assert_close(ema.model[0].weight, torch.full((2, 2), 2.0))


def test_decay_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="decay"):
        GeneratorEMA(constant_net(0.0), decay=1.0)


def test_unwrap_sees_through_ddp_and_compile_wrappers():
    from gan.ema import unwrap

    net = constant_net(1.0)
    compiled = torch.compile(net)
    assert unwrap(compiled) is net
    assert unwrap(net) is net
