"""Capture of what K-FAC factors are built from: forward and backward hooks that keep each
layer's latest input and the gradient with respect to its output."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Capture:
    """Hooks on `modules` (layer name -> module) that record, during a training-mode forward
    with gradients enabled and while `due()` holds, each layer's input (`inputs`) and, in the
    backward pass, the gradient of its output (`grad_outputs`), detached."""

    def __init__(self, modules: dict[str, nn.Module], due: Callable[[], bool] = lambda: True
                 ) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.grad_outputs: dict[str, torch.Tensor] = {}
        self._due = due
        self._hooks = [hook for name, module in modules.items()
                       for hook in self._register(name, module)]

    def _register(self, name: str, module: nn.Module) -> list:
        def save_input(mod: nn.Module, inputs: tuple) -> None:
            if mod.training and torch.is_grad_enabled() and self._due():
                self.inputs[name] = inputs[0].detach()

        def save_grad_output(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if mod.training and output.requires_grad and self._due():
                output.register_hook(
                    lambda grad: self.grad_outputs.__setitem__(name, grad.detach()))

        return [module.register_forward_pre_hook(save_input),
                module.register_forward_hook(save_grad_output)]

    def complete(self, names: list[str]) -> list[str]:
        """Those of `names` whose input and output gradient were both captured."""
        return [n for n in names if n in self.inputs and n in self.grad_outputs]

    def clear(self) -> None:
        """Forget everything captured so far."""
        self.inputs.clear()
        self.grad_outputs.clear()

    def remove(self) -> None:
        """Detach the hooks from the modules."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
