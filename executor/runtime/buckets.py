"""The gradient all-reduce in buckets posted from backward, as gradients become ready (the DDP
way): dpkfac.core.buckets says which parameters share a bucket and in which order they go."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from dpkfac.core.buckets import BUCKET_BYTES, FIRST_BUCKET_BYTES, gradient_buckets

from .finite import all_finite


def model_bucket_bytes(model: nn.Module) -> list[int]:
    """Gradient bytes of each of `model`'s buckets, in posting order (the loss excluded)."""
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() * p.element_size() for p in params]
    return [sum(sizes[i] for i in group) for group in gradient_buckets(sizes)]


class GradientBuckets:
    """Averages a model's gradients across ranks in buckets.

    Per step: arm(loss) before the last micro-batch's backward; each bucket's asynchronous
    all-reduce is then posted from a post-accumulate-grad hook as soon as all its gradients are
    ready and every earlier bucket is posted (so every rank posts them in the same order);
    post_remaining() after backward posts what is left (gradients of parameters backward did not
    reach travel as zeros and stay None); wait() averages, checks and copies back. The loss
    (a 1-element tensor) rides at the end of bucket 0. Unarmed, the hooks do nothing: earlier
    micro-batches accumulate locally, and a step that arms only after backward (the serial step)
    posts every bucket from post_remaining(), the same buffers in the same order. A parameter
    backward does not reach holds its bucket, and every later one, until post_remaining().
    """

    def __init__(self, model: nn.Module, world_size: int, process_group=None, *,
                 record_times: bool = False, first_bytes: int = FIRST_BUCKET_BYTES,
                 bytes_per_bucket: int = BUCKET_BYTES) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world_size, self.process_group = world_size, process_group
        groups = gradient_buckets([p.numel() * p.element_size() for p in self.params],
                                  first_bytes=first_bytes, bytes_per_bucket=bytes_per_bucket)
        self.members = [[self.params[i] for i in group] for group in groups]
        self.bucket_of = {id(p): b for b, group in enumerate(self.members) for p in group}
        self.record_times = record_times
        self.ready_at: list[float] = []  # with record_times: each bucket's perf_counter() when ready
        self._armed = False
        self._loss: torch.Tensor | None = None
        self._left = [0] * len(self.members)
        self._posted: list[tuple[torch.Tensor, object]] = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def arm(self, loss: torch.Tensor) -> None:
        """Post buckets from the next backward as they become ready; `loss` (1 element) is
        averaged with bucket 0."""
        if self._armed or self._posted:
            raise RuntimeError("GradientBuckets.arm: the previous step's buckets are pending; "
                               "call wait() first")
        self._armed, self._loss = True, loss.detach().reshape(1)
        self._left = [len(group) for group in self.members]
        self.ready_at = [float("nan")] * len(self.members)

    def post_remaining(self) -> None:
        """Post every bucket not posted yet, in order (after backward)."""
        if not self._armed:
            raise RuntimeError("GradientBuckets.post_remaining: arm() first")
        now = time.perf_counter()
        while len(self._posted) < len(self.members):
            b = len(self._posted)
            if self.record_times and self._left[b]:
                self.ready_at[b] = now
            self._post(b)
        self._armed = False

    def wait(self) -> tuple[int, bool]:
        """Wait for every bucket, average, check, copy back into the gradients and the loss;
        returns (bytes of the buffers, whether they hold no NaN or inf: the same on every
        rank)."""
        if self._armed:
            self.post_remaining()
        flats = []
        for flat, work in self._posted:
            if work is not None:
                work.wait()
                flat.div_(self.world_size)
            flats.append(flat)
        self._posted = []
        finite = all(all_finite(flat) for flat in flats)
        for b, (group, flat) in enumerate(zip(self.members, flats)):
            offset = 0
            for p in group:
                if p.grad is not None:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
            if b == 0:
                self._loss.copy_(flat[-1:])
        return sum(f.numel() * f.element_size() for f in flats), finite

    def remove(self) -> None:
        """Remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self._armed:
            return
        b = self.bucket_of[id(param)]
        self._left[b] -= 1
        if self._left[b] == 0 and self.record_times:
            self.ready_at[b] = time.perf_counter()
        while len(self._posted) < len(self.members) and self._left[len(self._posted)] == 0:
            self._post(len(self._posted))

    def _post(self, b: int) -> None:
        group = self.members[b]
        pieces = [p.grad.reshape(-1) if p.grad is not None
                  else torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for p in group]
        if b == 0:
            pieces.append(self._loss.to(pieces[0].dtype) if pieces else self._loss)
        flat = torch.cat(pieces)
        work = None
        if self.world_size > 1:
            work = dist.all_reduce(flat, group=self.process_group, async_op=True)
        self._posted.append((flat, work))
