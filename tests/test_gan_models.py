"""Generation models: shapes, ranges, the paper's structure (dropout stages, 70x70 receptive field), export audit."""

import pytest
import torch
from torch import nn

from edgepix.export.audit import audit_model
from edgepix.train.models.pix2pix import PatchDiscriminator
from edgepix.train.registry import create_model, get_entry, list_models


def test_registry_tasks():
    assert {"dcgan", "dcgan_d", "pix2pix", "patchgan"} <= set(list_models())
    assert get_entry("dcgan").task == "generation-noise"
    assert get_entry("pix2pix").task == "generation-image"
    assert get_entry("dcgan_d").task == get_entry("patchgan").task == "discriminator"


@pytest.mark.parametrize("size", [32, 64, 128])
def test_dcgan_shapes_and_range(size):
    torch.manual_seed(0)
    g = create_model("dcgan", image_size=size, ngf=8, latent_size=16)
    d = create_model("dcgan_d", image_size=size, ndf=8)
    z = torch.randn(3, 16) * 10  # large inputs saturate tanh but never leave [-1, 1]
    with torch.no_grad():
        y = g(z)
    assert y.shape == (3, 3, size, size)
    assert float(y.min()) >= -1 and float(y.max()) <= 1
    assert d(y).shape == (3,)
    # Stages: 4x4 projection then log2(size / 4) stride-2 upsamplings.
    n_up = sum(isinstance(m, nn.ConvTranspose2d) for m in g.modules())
    assert n_up == {32: 4, 64: 5, 128: 6}[size]


def test_dcgan_width_and_spectral_norm():
    g = create_model("dcgan", image_size=64, ngf=8, max_channels=32)
    widths = [m.out_channels for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert widths == [32, 32, 16, 8, 3]  # 8 * 2**3 = 64 capped at 32
    d = create_model("dcgan_d", image_size=32, ndf=4, norm="spectral")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    assert d(torch.randn(2, 3, 32, 32)).shape == (2,)
    with pytest.raises(ValueError, match="image_size"):
        create_model("dcgan", image_size=48)


@pytest.mark.parametrize("variant,size,n_dropout", [("unet_128", 128, 2), ("unet_256", 256, 3)])
def test_unet_structure(variant, size, n_dropout):
    g = create_model("pix2pix", variant=variant, ngf=4)
    assert g.size_divisor == size
    drops = [m for m in g.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == n_dropout and all(m.p == 0.5 for m in drops)  # the paper's n_downs - 5 stages
    g.eval()
    with torch.no_grad():
        y = g(torch.randn(2, 3, size, size))
    assert y.shape == (2, 3, size, size) and float(y.abs().max()) <= 1
    # Fully convolutional: twice the size works too.
    assert g(torch.randn(1, 3, 2 * size, size)).shape == (1, 3, 2 * size, size)
    inst = create_model("pix2pix", variant=variant, ngf=4, norm="instance", dropout=0.0)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in inst.modules())
    assert all(m.bias is not None for m in inst.modules() if isinstance(m, nn.Conv2d))


def test_patchgan_receptive_field_is_70():
    assert PatchDiscriminator.receptive_field(3) == 70
    d = create_model("patchgan", ndf=4).eval()  # eval BatchNorm is per-pixel, so gradients show the field
    x = torch.randn(1, 6, 128, 128, requires_grad=True)
    out = d(x)
    assert out.shape == (1, 1, 14, 14)
    out[0, 0, 7, 7].backward()
    rows, cols = torch.nonzero(x.grad.abs().sum((0, 1)) > 0, as_tuple=True)
    assert int(rows.max() - rows.min() + 1) == 70 and int(cols.max() - cols.min() + 1) == 70


def test_generators_pass_the_export_audit():
    g = create_model("dcgan", image_size=32, ngf=4, latent_size=8)
    assert audit_model(g.eval(), torch.randn(1, 8)) == []
    p = create_model("pix2pix", variant="unet_128", ngf=4)
    assert audit_model(p.eval(), torch.randn(1, 3, 128, 128), dynamic_size=True) == []
