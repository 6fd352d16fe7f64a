"""smp FPN / DeepLabV3+ with a depth head on the shared decoder, and weight loading."""

from __future__ import annotations

import math
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from safetensors.torch import load_file
from torch import nn

from kfold.config import Recipe

ARCHS = {"fpn": smp.FPN, "deeplabv3plus": smp.DeepLabV3Plus}
INITIAL_DEPTH_M = 3.0  # the depth head starts near a typical indoor distance


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None (fp32) on CPU or when off; bf16 where the GPU supports it, else fp16."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16" or (setting == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class SegDepthNet(nn.Module):
    """An smp segmentation model whose decoder also feeds a 1-channel depth head (metres, >= 0).

    Args:
        arch: ``fpn`` or ``deeplabv3plus``.
        encoder: any smp encoder name, or a timm encoder as ``tu-<name>``.
        encoder_weights: ``imagenet`` (or another smp weight name), or None for random init.
        in_channels: 3 (RGB) or 4 (RGB + inverse depth).
        num_classes: number of segmentation classes.
        depth_head: add the depth head; without it ``forward`` returns logits only.
        decoder_channels: FPN pyramid channels (the segmentation branch gets half) or DeepLabV3+ decoder width.
    """

    def __init__(self, arch: str, encoder: str, encoder_weights: str | None, in_channels: int,
                 num_classes: int, depth_head: bool = True, decoder_channels: int = 256):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"model.arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        # Build with 3 channels so pretrained RGB filters load untouched, then add the depth channel ourselves.
        if arch == "fpn" and decoder_channels % 64:
            # smp's FPN segmentation branch (half the width) uses GroupNorm with 32 groups.
            raise ValueError(f"model.decoder_channels: FPN needs a multiple of 64, got {decoder_channels}")
        widths = ({"decoder_pyramid_channels": decoder_channels,
                   "decoder_segmentation_channels": max(1, decoder_channels // 2)}
                  if arch == "fpn" else {"decoder_channels": decoder_channels})
        self.net = ARCHS[arch](encoder_name=encoder, encoder_weights=encoder_weights, in_channels=3,
                               classes=num_classes, **widths)
        if in_channels != 3:
            expand_first_conv(self.net.encoder, in_channels, zero_init=encoder_weights is not None)
        self.in_channels = in_channels
        self.output_stride = self.net.encoder.output_stride
        self.depth_head = None
        if depth_head:
            seg_conv, upsample = self.net.segmentation_head[0], self.net.segmentation_head[1]
            scale = int(upsample.scale_factor) if isinstance(upsample, nn.Upsample) else 1
            self.depth_head = smp.base.SegmentationHead(seg_conv.in_channels, 1, kernel_size=3, upsampling=scale)
            nn.init.zeros_(self.depth_head[0].weight)
            nn.init.constant_(self.depth_head[0].bias, math.log(math.expm1(INITIAL_DEPTH_M)))

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.net.encoder(x)
        decoded = self.net.decoder(features)
        logits = self.net.segmentation_head(decoded)
        if self.depth_head is None:
            return logits
        return logits, nn.functional.softplus(self.depth_head(decoded))


def expand_first_conv(encoder: nn.Module, in_channels: int, zero_init: bool) -> None:
    """Give the encoder's first 3-channel convolution ``in_channels`` inputs.

    With pretrained weights the new channels start at zero, so the network starts as the pretrained RGB
    model and learns how much to use depth (smp's own patch copies red filters and rescales all of them).
    Without pretrained weights the new channels get the same init scale as the RGB ones.
    """
    conv = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if conv is None:
        raise ValueError(f"{type(encoder).__name__}: no 3-channel input convolution to expand")
    rgb = conv.weight.detach()
    extra_shape = (rgb.shape[0], in_channels - 3, *rgb.shape[2:])
    if zero_init:
        extra = torch.zeros(extra_shape, dtype=rgb.dtype)
    else:
        extra = torch.randn(extra_shape, dtype=rgb.dtype) * rgb.std()
    conv.weight = nn.Parameter(torch.cat([rgb, extra], dim=1))
    conv.in_channels = in_channels


def build_model(arch: str, encoder: str, encoder_weights: str | None, in_channels: int, num_classes: int,
                depth_head: bool = True, decoder_channels: int = 256) -> SegDepthNet:
    """Build a :class:`SegDepthNet` (see its arguments)."""
    return SegDepthNet(arch, encoder, encoder_weights, in_channels, num_classes, depth_head, decoder_channels)


def model_from_recipe(recipe: Recipe, num_classes: int, pretrained: bool = True) -> SegDepthNet:
    """The recipe's model; ``pretrained=False`` skips downloading weights that are about to be replaced."""
    m = recipe.model
    return build_model(m.arch, m.encoder, m.encoder_weights if pretrained else None, recipe.data.in_channels,
                       num_classes, m.depth_head, m.decoder_channels)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from a ``.safetensors`` file or a checkpoint dict (``ema``, ``model`` or ``state_dict``).

    Checkpoints are loaded with ``weights_only=True``: a file that carries pickled objects is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001 - SafetensorError is not a ValueError
            raise ValueError(f"{path}: not a readable safetensors file ({str(err).strip()})") from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise ValueError(f"{path}: not a weights-only checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]})") from None
    for key in ("ema", "model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise ValueError(f"{path}: no state dict found (expected keys 'ema', 'model' or 'state_dict')")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights into ``model``; a missing, unexpected or mis-shaped tensor is a clear error."""
    state = read_state_dict(path)
    own = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch: {mismatched[0]}" + (f" (+{len(mismatched) - 1} more)"
                                                               if len(mismatched) > 1 else ""))
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        raise ValueError(f"{path}: weights do not fit this model: {'; '.join(parts)}")
    model.load_state_dict(state)
