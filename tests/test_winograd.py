"""NNPACK Winograd convolutions for the CPU VAE decode (mvdiff.pipelines.winograd)."""

import copy

import pytest
import torch
from torch import nn

from mvdiff.pipelines import MVDreamPipeline
from mvdiff.pipelines.winograd import WinogradConv2d, use_winograd_convs, winograd_available
from mvdiff.testing import tiny_components

pytestmark = pytest.mark.skipif(not winograd_available(), reason="PyTorch built without NNPACK")


@pytest.mark.parametrize("padding,batch", [((1, 1), 1), ((0, 0), 3), ((2, 0), 2)])
def test_matches_the_normal_convolution(padding, batch):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=padding)
    x = torch.randn(batch, 16, 20, 24)
    with torch.no_grad():
        expected = conv(x)
        assert use_winograd_convs(conv) == 1 and type(conv) is WinogradConv2d
        got = conv(x)
    assert got.shape == expected.shape
    assert not torch.equal(got, expected)  # really another algorithm
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_only_eligible_layers_switch_and_switch_back():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1),  # yes
        nn.Conv2d(4, 4, 1),  # 1x1: no
        nn.Conv2d(4, 4, 3, stride=2, padding=1),  # strided: no
        nn.Conv2d(4, 4, 3, padding=1, groups=2),  # grouped: no
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),  # not zero padding: no
        nn.Conv2d(4, 4, 3, padding="same"),  # string padding: no
    )
    keys = list(model.state_dict())
    assert use_winograd_convs(model) == 1
    assert use_winograd_convs(model) == 1  # idempotent
    assert [type(m) for m in model][:2] == [WinogradConv2d, nn.Conv2d]
    assert list(model.state_dict()) == keys
    assert type(copy.deepcopy(model)[0]) is WinogradConv2d
    assert use_winograd_convs(model, enable=False) == 0 and type(model[0]) is nn.Conv2d


def test_autograd_and_other_dtypes_take_the_normal_path():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    reference = copy.deepcopy(conv)
    use_winograd_convs(conv)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    assert torch.equal(conv(x), reference(x))  # grad enabled: exactly nn.Conv2d
    conv(x).sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        xb = x.detach().bfloat16()
        assert torch.equal(conv.bfloat16()(xb), reference.bfloat16()(xb))


def test_pipeline_decodes_with_winograd_on_cpu_and_matches_the_normal_decode():
    pipe = MVDreamPipeline(**tiny_components(0))
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    pipe.winograd_decode = False
    plain = pipe.decode_latents(latents)
    assert not any(type(m) is WinogradConv2d for m in pipe.vae.modules())
    pipe.winograd_decode = True
    fast = pipe.decode_latents(latents)
    n = sum(type(m) is WinogradConv2d for m in pipe.vae.decoder.modules())
    assert n == sum(
        type(m) in (nn.Conv2d, WinogradConv2d) and m.kernel_size == (3, 3)
        for m in pipe.vae.decoder.modules()
    )
    assert n > 0
    assert (fast - plain).abs().max().item() < 1e-4  # images in [0, 1]


def test_pipeline_leaves_the_vae_alone_by_default():
    """Winograd is opt-in: a default pipeline decodes with the VAE exactly as loaded (no
    module has its class swapped), and turning it off again restores nn.Conv2d."""
    pipe = MVDreamPipeline(**tiny_components(0))
    assert pipe.winograd_decode is False
    classes = [type(m) for m in pipe.vae.modules()]
    pipe.decode_latents(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert [type(m) for m in pipe.vae.modules()] == classes
    pipe.winograd_decode = True
    pipe.decode_latents(torch.zeros(1, 4, 8, 8))
    pipe.winograd_decode = False
    pipe.decode_latents(torch.zeros(1, 4, 8, 8))
    assert [type(m) for m in pipe.vae.modules()] == classes
