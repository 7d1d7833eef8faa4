"""Frozen stages and norm_eval, shared by every backbone."""

from __future__ import annotations

from typing import Self

from torch import nn


class StageFreezing(nn.Module):
    """A backbone whose first stages take no gradient and stay in eval mode (``_frozen_modules``),
    and whose BatchNorm layers all stay in eval mode in training when ``norm_eval`` is set."""

    norm_eval: bool = False

    def _frozen_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        if mode:
            for m in self._frozen_modules():
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self
