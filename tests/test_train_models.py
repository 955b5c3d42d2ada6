"""Segmentation models: registry, shapes, parameter counts, and ONNX export parity at two input sizes."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edgepix.runtime.core.errors import EdgepixError  # noqa: E402
from edgepix.train.registry import create_model, get_entry, list_models  # noqa: E402

SEG_MODELS = list_models(task="segmentation")
# Small variants keep the export test fast; the architecture (and so every exported construct) is the same.
SMALL = {
    "fastscnn": {},
    "unet": {"base_channels": 8, "depth": 3},
    "lraspp": {},
}


def test_every_segmentation_model_is_covered_here():
    assert {"fastscnn", "unet", "lraspp"} <= set(SEG_MODELS)
    assert set(SEG_MODELS) <= set(SMALL), f"add new models to SMALL: {set(SEG_MODELS) - set(SMALL)}"
    for name in SEG_MODELS:
        assert get_entry(name).task == "segmentation"


def test_fastscnn_matches_the_paper_size():
    n19 = sum(p.numel() for p in create_model("fastscnn", num_classes=19).parameters())
    n6 = sum(p.numel() for p in create_model("fastscnn", num_classes=6).parameters())
    assert 1.05e6 < n19 < 1.2e6  # Poudel et al.: 1.11M at 19 classes
    assert n19 - n6 == 13 * 129  # only the 1x1 classifier (128 inputs + bias) depends on the classes


def test_unet_width_and_depth_are_configurable():
    small = create_model("unet", num_classes=3, base_channels=8, depth=2)
    big = create_model("unet", num_classes=3, base_channels=16, depth=4)
    n_small = sum(p.numel() for p in small.parameters())
    n_big = sum(p.numel() for p in big.parameters())
    assert n_small < 40_000 < 1_000_000 < n_big
    assert len(big.down) == 4 and len(small.down) == 2
    with pytest.raises(ValueError, match="depth"):
        create_model("unet", num_classes=3, depth=0)


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(EdgepixError, match="fastscnn") as e:
        create_model("fastscn", num_classes=3)
    assert "Did you mean 'fastscnn'" in str(e.value)


@pytest.mark.parametrize("name", SEG_MODELS)
def test_output_is_logits_at_input_resolution(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **SMALL[name]).eval()
    for h, w in ((64, 64), (96, 160)):
        with torch.no_grad():
            y = model(torch.randn(2, 3, h, w))
        assert y.shape == (2, 5, h, w)
        assert torch.isfinite(y).all()
    # A fresh model starts with small logits: the first loss is about ln(C).
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.randint(0, 5, (2, 64, 64)))
    assert abs(loss.item() - np.log(5)) < 0.1


def _randomise_batchnorm(model):
    """Non-trivial running statistics, so that an exporter that mishandles BatchNorm is caught."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


def _export(model, x, *, dynamic: bool) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), f, opset_version=17, dynamo=False, input_names=["images"], output_names=["output"],
            dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}, "output": {0: "n", 2: "h", 3: "w"}} if dynamic else None,
        )
    return f.getvalue()


@pytest.mark.parametrize("name", SEG_MODELS)
def test_onnx_export_matches_pytorch_at_two_sizes(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=6, **SMALL[name]).eval()
    _randomise_batchnorm(model)
    rng = np.random.default_rng(0)
    for h, w in ((64, 64), (96, 128)):
        x = rng.standard_normal((1, 3, h, w)).astype(np.float32)
        session = ort.InferenceSession(_export(model, torch.from_numpy(x), dynamic=False),
                                       providers=["CPUExecutionProvider"])
        out = session.run(None, {"images": x})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert out.shape == ref.shape == (1, 6, h, w)
        assert np.abs(out - ref).max() <= 1e-4, f"{name} at {h}x{w}: max abs diff {np.abs(out - ref).max()}"
        assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("name", SEG_MODELS)
def test_dynamic_size_export_holds_at_a_size_it_was_not_traced_at(name):
    """No shape is frozen into the graph (no shape-dependent pooling): one dynamic graph serves every size."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, **SMALL[name]).eval()
    _randomise_batchnorm(model)
    session = ort.InferenceSession(_export(model, torch.randn(1, 3, 64, 64), dynamic=True),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 3, 96, 160)).astype(np.float32)
    out = session.run(None, {"images": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert out.shape == (2, 4, 96, 160)
    assert np.abs(out - ref).max() <= 1e-4


def test_models_pass_the_export_audit():
    from edgepix.export.audit import audit_model

    for name in SEG_MODELS:
        model = create_model(name, num_classes=3, **SMALL[name]).eval()
        findings = audit_model(model, torch.randn(1, 3, 96, 128), dynamic_size=True)
        assert findings == [], f"{name}: {[str(f) for f in findings]}"
