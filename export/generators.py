"""Export rules for generators: train-mode graphs, their PyTorch reference, and the inputs a generator expects.

Train mode (`--train-mode`). pix2pix runs its generator at test time "in exactly the same manner as during the
training phase": BatchNorm with the statistics of the test batch (batch size 1, i.e. instance normalisation) and,
in the paper, dropout. These are two different things for deployment:

- Normalisation with the input's own statistics is deterministic. The exported graph computes it *per image*
  (`InstanceNormalization` with the BatchNorm's scale and shift), which is exactly PyTorch's train-mode BatchNorm
  for a batch of one, and stays correct when the runtime batches several images: a batch-statistics graph would
  make each output depend on the other images in its batch. The parity gate runs PyTorch in train mode on batches
  of one (with dropout off) and needs the usual PSNR (>= 40 dB FP32).
- Dropout is noise. It stays off (the eval-mode identity) unless `--dropout` asks for it; then each Dropout becomes
  `x * (RandomUniformLike(x) >= p) / (1 - p)` in the graph, so every run draws new masks, as PyTorch does, and no
  backend can reproduce PyTorch's draws. The gate then compares distributions instead of pixels: for each
  verification input it averages k outputs of the artifact and k of PyTorch and requires the artifact's mean to be
  as close to PyTorch's mean as a second, independent PyTorch mean is (PSNR within 1 dB), and the per-pixel spread
  of the outputs to match (std ratio 0.8-1.25), which also proves the dropout is really active.

Transposed convolutions (`--deconv`). ONNX Runtime's CPU ConvTranspose runs each image of a batch on its own: one
matrix product, then a scalar col2im scatter-add (about a fifth of a DCGAN-64's time on one thread) that a second
thread barely speeds up. Batching then barely helps. Two other forms compute the same function:

- `subpixel`: a 4x4, stride-2, padding-1 transposed convolution is four 2x2 convolutions, one per output phase
  (even/odd row x even/odd column), whose outputs interleave into the doubled image. ONNX Runtime runs these Convs
  in its blocked (NCHWc) layout with the whole batch in one call, fuses the ReLU into them (the BatchNorm that
  follows is folded into their weights here) and writes them out channels-last, where the interleave is a copy of
  whole channel vectors (Concat), not the per-element shuffle of DepthToSpace in NCHW. Layers whose output channels
  are not a multiple of 16 (an RGB output layer) keep ConvTranspose: ONNX Runtime has no blocked kernel for them.
- `col2im`: the transposed convolution as one MatMul over the whole batch followed by ONNX Col2Im (opset 18), at
  the fixed size the model was exported at. Kept for comparison: ONNX Runtime's Col2Im is a scalar loop too.

Everything is built on a deep copy: the caller's model is not changed.
"""

from __future__ import annotations

import copy
import enum

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgepix.runtime.core.errors import ExportError
from edgepix.runtime.description.spec import ModelSpec, Task


class PerImageNorm(nn.Module):
    """A BatchNorm2d that normalises with each image's own statistics (train-mode BatchNorm for a batch of one)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.eps = bn.eps
        self.weight = None if bn.weight is None else nn.Parameter(bn.weight.detach().clone(), requires_grad=False)
        self.bias = None if bn.bias is None else nn.Parameter(bn.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


class SampledDropout(nn.Module):
    """Dropout that is always active: exported as RandomUniformLike >= p, a new mask on every run."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (torch.rand_like(x) >= self.p).to(x.dtype)
        return x * keep * (1.0 / (1.0 - self.p))


def _replace(module: nn.Module, *, dropout: bool) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, PerImageNorm(child))
        elif isinstance(child, (nn.Dropout, nn.Dropout2d)):
            setattr(module, name, SampledDropout(child.p) if dropout and child.p > 0 else nn.Identity())
        else:
            _replace(child, dropout=dropout)


def train_mode_graph(model: nn.Module, *, dropout: bool = False) -> nn.Module:
    """A copy of `model` whose eval-mode forward is its train-mode forward, image by image (see the docstring)."""
    graph = copy.deepcopy(model)
    _replace(graph, dropout=dropout)
    return graph.eval()


def reference_mode(model: nn.Module, *, train_mode: bool, dropout: bool = False) -> nn.Module:
    """Put the PyTorch reference in the mode the artifact was exported in: train-mode normalisation with dropout
    only when asked for (the gate feeds it one image at a time)."""
    model.train(train_mode)
    if train_mode:
        for m in model.modules():
            if isinstance(m, (nn.Dropout, nn.Dropout2d)):
                m.train(dropout)
    return model


def generator_input_image(image: np.ndarray, mask: np.ndarray | None, spec: ModelSpec) -> np.ndarray:
    """What an image generator is fed for a (scene, mask) sample: a mask -> image model (its spec carries a
    palette) gets the mask painted with the palette (BGR), any other model the image itself."""
    if spec.task is not Task.GENERATION_IMAGE or not spec.palette or mask is None:
        return image
    table = np.zeros((256, 3), np.uint8)
    for i, (r, g, b) in enumerate(spec.palette):
        table[i] = (b, g, r)
    return table[mask]


class TransposedConvForm(str, enum.Enum):
    """How the exported graph computes PyTorch's transposed convolutions (see the module docstring)."""

    CONVTRANSPOSE = "convtranspose"  # ONNX ConvTranspose, as PyTorch computes it
    SUBPIXEL = "subpixel"  # four 2x2 Convs per 4x4 stride-2 layer, interleaved channels-last
    COL2IM = "col2im"  # one MatMul over the batch + Col2Im (opset 18, fixed size)


COL2IM_MIN_OPSET = 18
# ONNX Runtime's blocked convolutions need output channels in whole blocks (16 floats with AVX-512, 8 with AVX2).
SUBPIXEL_CHANNEL_BLOCK = 16
# Output row 2m + a of a 4x4, stride-2, padding-1 transposed convolution sums input rows (m - 1, m) through kernel
# rows (3, 1) when a = 0 and input rows (m, m + 1) through kernel rows (2, 0) when a = 1; columns alike. As a 2x2
# convolution, phase a reads the input padded by one zero row before it (a = 0) or after it (a = 1).
_PHASE_KERNEL_ROWS = {0: [3, 1], 1: [2, 0]}
_PHASE_PAD = {0: (1, 0), 1: (0, 1)}


def _is_subpixel_layer(m: nn.Module) -> bool:
    return (isinstance(m, nn.ConvTranspose2d) and m.kernel_size == (4, 4) and m.stride == (2, 2)
            and m.padding == (1, 1) and m.output_padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros" and m.out_channels % SUBPIXEL_CHANNEL_BLOCK == 0)


def _is_col2im_layer(m: nn.Module) -> bool:
    return (isinstance(m, nn.ConvTranspose2d) and m.output_padding == (0, 0) and m.groups == 1
            and m.padding_mode == "zeros")


class SubPixelConvTranspose(nn.Module):
    """A 4x4, stride-2, padding-1 ConvTranspose2d, with the eval-mode BatchNorm2d and the ReLU / LeakyReLU that
    follow it, as four 2x2 convolutions (one per output phase) interleaved channels-last into the doubled image."""

    def __init__(self, conv: nn.ConvTranspose2d, norm: nn.BatchNorm2d | None = None,
                 activation: nn.Module | None = None) -> None:
        super().__init__()
        weight = conv.weight.detach().double()  # (Cin, Cout, 4, 4)
        bias = conv.bias.detach().double() if conv.bias is not None else weight.new_zeros(conv.out_channels)
        if norm is not None:  # eval-mode BatchNorm: y * scale + shift, folded into each phase's weights and bias
            gamma = norm.weight.detach().double() if norm.weight is not None else 1.0
            beta = norm.bias.detach().double() if norm.bias is not None else 0.0
            scale = gamma / torch.sqrt(norm.running_var.double() + norm.eps)
            weight = weight * scale.view(1, -1, 1, 1)
            bias = (bias - norm.running_mean.double()) * scale + beta
        for a in (0, 1):
            for b in (0, 1):
                kernel = weight[:, :, _PHASE_KERNEL_ROWS[a]][:, :, :, _PHASE_KERNEL_ROWS[b]]  # (Cin, Cout, 2, 2)
                self.register_buffer(f"weight_{a}{b}", kernel.transpose(0, 1).float().contiguous())
        self.register_buffer("bias", bias.float())
        self.activation = activation if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for a in (0, 1):
            phases = []
            for b in (0, 1):
                padded = F.pad(x, (*_PHASE_PAD[b], *_PHASE_PAD[a]))  # (left, right, top, bottom)
                y = self.activation(F.conv2d(padded, getattr(self, f"weight_{a}{b}"), self.bias))
                phases.append(y.permute(0, 2, 3, 1))  # channels-last: the interleave copies whole vectors
            rows.append(torch.stack(phases, 3))  # (N, H, W, 2, C): columns 2w + b
        y = torch.stack(rows, 2)  # (N, H, 2, W, 2, C): rows 2h + a
        return y.flatten(3, 4).flatten(1, 2).permute(0, 3, 1, 2)


class Col2ImConvTranspose(nn.Module):
    """A ConvTranspose2d as one matrix product over the whole batch and a col2im (ONNX Col2Im) at a fixed size."""

    def __init__(self, conv: nn.ConvTranspose2d, input_size: tuple[int, int], output_size: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().flatten(1).t().contiguous())  # (Cout*kh*kw, Cin)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().view(1, -1, 1, 1).clone())
        # constant shapes: a Reshape computed from Shape ops would hide the tensor shapes from shape inference
        self.input_shape = (-1, conv.in_channels, int(input_size[0]) * int(input_size[1]))
        self.output_size = tuple(int(v) for v in output_size)
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = torch.matmul(self.weight, x.reshape(self.input_shape))  # (N, Cout*kh*kw, H*W)
        y = F.fold(columns, self.output_size, self.kernel_size, dilation=self.dilation, padding=self.padding,
                   stride=self.stride)
        return y if self.bias is None else y + self.bias


def _called_transposed_convs(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, tuple[tuple, tuple]]:
    """The ConvTranspose2d modules `model(example)` calls, with their input and output sizes. A module whose weight
    the forward pass uses directly (DCGAN's first layer, computed as a MatMul) is not called, so it is left alone."""
    sizes: dict[nn.Module, tuple[tuple, tuple]] = {}
    convs = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    handles = [m.register_forward_hook(
        lambda m, args, out: sizes.__setitem__(m, (tuple(args[0].shape[-2:]), tuple(out.shape[-2:])))) for m in convs]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return sizes


def _absorbed(siblings: list[nn.Module], i: int) -> dict[int, nn.Module]:
    """The eval-mode BatchNorm2d and the activation that directly follow siblings[i] in an nn.Sequential, by
    position."""
    found: dict[int, nn.Module] = {}
    j = i + 1
    if j < len(siblings) and isinstance(siblings[j], nn.BatchNorm2d) and not siblings[j].training \
            and siblings[j].running_var is not None:
        found[j] = siblings[j]
        j += 1
    if j < len(siblings) and isinstance(siblings[j], (nn.ReLU, nn.LeakyReLU)):
        found[j] = siblings[j]
    return found


def _rewrite(module: nn.Module, form: TransposedConvForm, called: dict[nn.Module, tuple[tuple, tuple]]) -> int:
    count = 0
    named = list(module.named_children())
    siblings = [child for _, child in named]
    for i, (name, child) in enumerate(named):
        if child not in called:
            count += _rewrite(child, form, called)
        elif form is TransposedConvForm.COL2IM and _is_col2im_layer(child):
            setattr(module, name, Col2ImConvTranspose(child, *called[child]))
            count += 1
        elif form is TransposedConvForm.SUBPIXEL and _is_subpixel_layer(child):
            absorbed = _absorbed(siblings, i) if isinstance(module, nn.Sequential) else {}
            norm = next((m for m in absorbed.values() if isinstance(m, nn.BatchNorm2d)), None)
            activation = next((m for m in absorbed.values() if not isinstance(m, nn.BatchNorm2d)), None)
            setattr(module, name, SubPixelConvTranspose(child, norm, activation))
            for j in absorbed:  # now computed inside the rewritten layer
                setattr(module, named[j][0], nn.Identity())
            count += 1
    return count


def transposed_conv_graph(model: nn.Module, form: TransposedConvForm, example: torch.Tensor, *,
                          opset: int, dynamic_size: bool) -> nn.Module:
    """A copy of the eval-mode `model` whose transposed convolutions are computed in `form` (the same function)."""
    form = TransposedConvForm(form)
    if form is TransposedConvForm.CONVTRANSPOSE:
        return model
    if form is TransposedConvForm.COL2IM and opset < COL2IM_MIN_OPSET:
        raise ExportError(f"--deconv col2im needs ONNX Col2Im: add --opset {COL2IM_MIN_OPSET} (got {opset})")
    if form is TransposedConvForm.COL2IM and dynamic_size:
        raise ExportError("--deconv col2im fixes each layer's output size; it cannot be combined with --dynamic-size "
                          "(use --deconv subpixel)")
    graph = copy.deepcopy(model).eval()
    if not _rewrite(graph, form, _called_transposed_convs(graph, example)):
        wanted = ("4x4, stride-2, padding-1 ConvTranspose2d with a multiple of "
                  f"{SUBPIXEL_CHANNEL_BLOCK} output channels" if form is TransposedConvForm.SUBPIXEL
                  else "ConvTranspose2d without groups or output_padding")
        raise ExportError(f"--deconv {form.value}: the model has no {wanted} to rewrite; drop --deconv")
    return graph
