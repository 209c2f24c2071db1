"""Cheap previews: a linear map from latents to RGB, fitted once per model from its own VAE.

    rgb (n, h, w, 3) = clamp(latents (n, C, h, w) . W (C, 3) + b (3,))   at latent resolution

At load, a few synthetic images (flat colours and gradients) are encoded by the VAE; the map is
the least-squares fit from their latents to the images average-pooled to latent resolution. That
costs a handful of VAE encodes at start and an einsum per preview, so previews do not slow the
denoising loop (benchmarks/diffusion.py measures it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["PreviewMap", "fit_preview_map"]


class PreviewMap:
    """A fitted latent -> RGB map."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight, self.bias = weight, bias  # (C, 3), (3,)

    def rgb(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (n, C, h, w) -> uint8 (n, h, w, 3)."""
        z = latents.detach().float().cpu().permute(0, 2, 3, 1)  # (n, h, w, C)
        img = (z @ self.weight + self.bias).clamp(0, 1)
        return (img * 255).round().to(torch.uint8).numpy()


def _calibration_images(size: int, channels: int = 3) -> torch.Tensor:
    """Flat colours and gradients in [-1, 1]: (k, 3, size, size)."""
    g = torch.Generator().manual_seed(0)
    flats = torch.rand(12, channels, 1, 1, generator=g).expand(12, channels, size, size)
    ramp = torch.linspace(0, 1, size)
    grads = []
    for c in range(channels):
        img = torch.rand(channels, 1, 1, generator=g).expand(channels, size, size).clone()
        img[c] = ramp[None, :].expand(size, size)
        grads.append(img)
    return torch.cat([flats, torch.stack(grads)]) * 2 - 1


@torch.inference_mode()
def fit_preview_map(vae: Any, scale_factor: int, device: str, dtype: torch.dtype,
                    size: int = 64) -> PreviewMap:
    """Fit the map on this VAE (latents scaled by its scaling_factor, as the UNet sees them)."""
    images = _calibration_images(max(size, scale_factor * 4))
    latents = vae.encode(images.to(device, dtype)).latent_dist.mean.float().cpu() * vae.config.scaling_factor
    target = torch.nn.functional.avg_pool2d((images + 1) / 2, scale_factor)  # (k, 3, h, w) in [0, 1]
    z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # (C + 1, 3)
    return PreviewMap(solution[:-1].contiguous(), solution[-1].contiguous())
