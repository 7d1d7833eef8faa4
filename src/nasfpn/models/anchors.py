"""Anchor boxes on every pyramid level, computed the way MMDetection's AnchorGenerator does.

On a level with stride s, anchor type ``a = ratio_index * S + scale_index`` has width
``s * (1/sqrt(r)) * scale`` and height ``s * sqrt(r) * scale`` (float32, in that order of
operations) and is centred at ``(x * s, y * s)``. Flat index within a level:
``(y * W + x) * A + a``; levels are concatenated P3..P7. This is the row order of a head map
``permute(0, 2, 3, 1).reshape(N, -1, K)``.
"""

from __future__ import annotations

import math

import torch


def level_anchors(base: torch.Tensor, h: int, w: int, stride: int) -> torch.Tensor:
    """``(h*w*A, 4)`` anchors of one level: ``base`` (A, 4) centred on every cell. Plain tensor
    ops on the sizes, so an exported graph can compute them for an input size it learns at run time."""
    shift_x = torch.arange(w, dtype=torch.float32, device=base.device) * stride
    shift_y = torch.arange(h, dtype=torch.float32, device=base.device) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack([xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)], dim=-1)
    return (base[None, :, :] + shifts[:, None, :]).reshape(-1, 4)


class AnchorGenerator:
    def __init__(
        self,
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        octave_base_scale: float = 4.0,
        scales_per_octave: int = 3,
        ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    ) -> None:
        self.strides = tuple(int(s) for s in strides)
        # Scales in float64, then one cast to float32 (as numpy -> torch.Tensor in MMDetection).
        scales = torch.tensor(
            [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)], dtype=torch.float64
        ).float()
        ratios_t = torch.tensor(ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios_t)
        w_ratios = 1 / h_ratios
        self.base_anchors = []
        for s in self.strides:
            ws = (s * w_ratios[:, None] * scales[None, :]).reshape(-1)
            hs = (s * h_ratios[:, None] * scales[None, :]).reshape(-1)
            self.base_anchors.append(torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1))
        self.num_anchors = len(ratios) * scales_per_octave
        self._cache: dict[tuple, list[torch.Tensor]] = {}

    def grid_anchors(self, sizes: list[tuple[int, int]], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Per level ``(H*W*A, 4)`` float32 xyxy anchors for feature maps of ``sizes`` (H, W).

        Cached per (sizes, device): the same input size reuses the same tensors.
        """
        key = (tuple(tuple(int(v) for v in hw) for hw in sizes), str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        out = [
            level_anchors(base, h, w, s).to(device) for (h, w), s, base in zip(key[0], self.strides, self.base_anchors)
        ]
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = out
        return out

    def valid_flags(
        self, sizes: list[tuple[int, int]], pad_hw: tuple[int, int], device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Bool ``(sum H*W*A,)``: the anchor's cell lies inside the padded image ``pad_hw``.

        An image smaller than the batch tensor has no valid anchors beyond its own padding.
        """
        flags = []
        for (h, w), s in zip(sizes, self.strides):
            valid_h = min(math.ceil(pad_hw[0] / s), h)
            valid_w = min(math.ceil(pad_hw[1] / s), w)
            vy = torch.arange(h, device=device) < valid_h
            vx = torch.arange(w, device=device) < valid_w
            cell = (vy[:, None] & vx[None, :]).reshape(-1)
            flags.append(cell[:, None].expand(-1, self.num_anchors).reshape(-1))
        return torch.cat(flags)
