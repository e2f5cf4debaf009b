"""Capture of what K-FAC factors are built from: forward and backward hooks that keep, per
layer, the inputs and output gradients of every micro-batch since the last clear."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Capture:
    """Hooks on `modules` (layer name -> module) that record, during a training-mode forward
    with gradients enabled and while `due()` holds, each layer's input (`inputs`) and, in the
    backward pass, the gradient of its output (`grad_outputs`), detached and in the dtype they
    came in (bf16 under autocast).

    Gradient accumulation: every forward+backward (micro-batch) since the last `clear()` adds
    one tensor to the layer's list, in order; `batch(name)` concatenates them along dim 0 (the
    batch dimension). Memory: the activations and output gradients of all K micro-batches of
    a step are held until the step clears them.
    """

    def __init__(self, modules: dict[str, nn.Module], due: Callable[[], bool] = lambda: True
                 ) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.grad_outputs: dict[str, list[torch.Tensor]] = {}
        self._due = due
        self._hooks = [hook for name, module in modules.items()
                       for hook in self._register(name, module)]

    def _register(self, name: str, module: nn.Module) -> list:
        def save_input(mod: nn.Module, inputs: tuple) -> None:
            if mod.training and torch.is_grad_enabled() and self._due():
                self.inputs.setdefault(name, []).append(inputs[0].detach())

        def save_grad(grad: torch.Tensor) -> None:
            self.grad_outputs.setdefault(name, []).append(grad.detach())

        def save_grad_output(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if mod.training and output.requires_grad and self._due():
                output.register_hook(save_grad)

        return [module.register_forward_pre_hook(save_input),
                module.register_forward_hook(save_grad_output)]

    def batch(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, output gradients) of layer `name`: each the concatenation along dim 0 of
        every micro-batch captured since the last clear (the tensor itself for one)."""
        return self.batch_inputs(name), self.batch_grad_outputs(name)

    def batch_inputs(self, name: str) -> torch.Tensor:
        """batch(name)[0] alone: the layer's inputs of every micro-batch, concatenated."""
        return _concat(self.inputs[name])

    def batch_grad_outputs(self, name: str) -> torch.Tensor:
        """batch(name)[1] alone: the layer's output gradients of every micro-batch, concatenated."""
        return _concat(self.grad_outputs[name])

    def complete(self, names: list[str]) -> list[str]:
        """Those of `names` with at least one captured input and one output gradient."""
        return [n for n in names if self.inputs.get(n) and self.grad_outputs.get(n)]

    def clear(self) -> None:
        """Forget everything captured so far."""
        self.inputs.clear()
        self.grad_outputs.clear()

    def remove(self) -> None:
        """Detach the hooks from the modules."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
