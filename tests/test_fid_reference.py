"""FID/KID with the standard semantics, checked against torchmetrics on the same images
and the same feature network (issue 21 item 8): 8-bit images, the network's pool features
(`return_features=True` of the FID Inception TorchScript, never its logits), values in
[0, 255], bilinear resize to the network's size, unbiased covariances and unbiased MMD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mvdiff.eval.features import load_feature_extractor
from mvdiff.eval.metrics import frechet_distance, kernel_inception_distance

SIZE = 16  # the toy network's input size (299 for the real Inception)


class ToyFidInception(torch.nn.Module):
    """The calling convention of `inception-2015-12-05.pt` (StyleGAN / clean-fid): float
    input in [0, 255] at any size, resized to its own size inside, normalised inside;
    `return_features=True` gives the pool features, otherwise logits."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 12, 3, stride=2)
        self.fc = torch.nn.Linear(12, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.shape[2] != 16 or x.shape[3] != 16:  # SIZE
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        x = (x - 128.0) / 128.0
        features = torch.relu(self.conv(x)).mean(dim=(2, 3))  # (N, 12, h, w) -> (N, 12)
        if return_features:
            return features
        return self.fc(features)


class Wrapped(torch.nn.Module):
    """The same network as torchmetrics takes a custom feature extractor (uint8 in)."""

    num_features = 12

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.float(), return_features=True)


def image_sets(n_a=24, n_b=20, side=20):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (n_a, 3, side, side), generator=g, dtype=torch.uint8)
    b = (a[:n_b].int() * 3 // 4 + 40).to(torch.uint8)  # another distribution
    return a, b


@pytest.fixture
def network(tmp_path):
    path = tmp_path / "inception-toy.pt"
    torch.jit.save(torch.jit.script(ToyFidInception().eval()), str(path))
    return torch.jit.load(str(path)), path


def test_features_are_the_pool_features_of_8_bit_images(network):
    net, path = network
    fx = load_feature_extractor(str(path), size=SIZE)
    assert fx.kind == "torchscript-fid-inception" and fx.input_mode == "uint8"
    a, _ = image_sets()
    unit = a.float() / 255.0
    f = fx(unit)
    assert f.shape == (24, 12)  # features, not the 5 logits
    with torch.no_grad():
        expected = net(a.float(), return_features=True)
    torch.testing.assert_close(f, expected, rtol=1e-5, atol=1e-5)
    # images are compared as 8-bit images: values within half a level give the same features
    assert torch.equal(fx((unit + 0.4 / 255).clamp(0, 1)), f)


def test_fid_and_kid_match_torchmetrics_on_the_same_images(network):
    torchmetrics = pytest.importorskip("torchmetrics")
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    net, path = network
    fx = load_feature_extractor(str(path), size=SIZE)
    a, b = image_sets()
    f_a, f_b = fx(a.float() / 255.0), fx(b.float() / 255.0)

    fid = FrechetInceptionDistance(feature=Wrapped(net), normalize=False)
    fid.update(a, real=True)
    fid.update(b, real=False)
    ours = frechet_distance(f_b, f_a)
    theirs = float(fid.compute())
    print(f"FID ours {ours:.6f} torchmetrics {theirs:.6f} ({torchmetrics.__version__})")
    assert ours > 0.01 and abs(ours - theirs) <= 1e-4 * theirs

    # KID: subsets of all 20 images, so both draw the same sets (in another order)
    a20 = a[:20]
    kid = KernelInceptionDistance(feature=Wrapped(net), subsets=3, subset_size=20,
                                  normalize=False)  # fmt: skip
    kid.update(a20, real=True)
    kid.update(b, real=False)
    k_mean, k_std = (float(v) for v in kid.compute())
    ours_mean, ours_std = kernel_inception_distance(f_b, f_a[:20], subset_size=20, num_subsets=3)
    assert abs(ours_mean - k_mean) <= 1e-4 * abs(k_mean) and ours_mean > 0
    assert ours_std == pytest.approx(k_std, abs=1e-6)


def test_kid_of_one_distribution_is_unbiased(network):
    """The unbiased MMD: two halves of one distribution give KID near 0 (negative values
    possible), an estimator with the diagonal kept would be clearly positive."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64)
    mean, std = kernel_inception_distance(x[:200], x[200:], subset_size=100, num_subsets=50)
    assert abs(mean) < 3 * std + 1e-3


def test_torchvision_state_dicts_load_strictly(tmp_path):
    """A state dict with a weight missing is refused (it used to be loaded non-strictly,
    leaving that layer random)."""
    torchvision = pytest.importorskip("torchvision")
    from mvdiff.errors import UserError

    state = torchvision.models.inception_v3(weights=None, aux_logits=False,
                                            init_weights=False).state_dict()  # fmt: skip
    state.pop("Mixed_7c.branch_pool.conv.weight")
    path = tmp_path / "inception.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match="not an inception_v3 state dict"):
        load_feature_extractor(str(path))
