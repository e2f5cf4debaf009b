"""The model zoo: built-in models by name, or `package.module:callable` for a user's own.

Each built-in model says what one input sample looks like, so the profiler (and training on
synthetic data) can feed it without a data set. Only digits-* models have a real data set here
(scikit-learn's 8x8 digits); the CIFAR- and ImageNet-shaped ResNets and the BERT-like encoder are
there to be profiled and planned, at their real layer shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dpkfac.core.errors import InputError

from .callables import call_checked, is_callable_spec, load_callable


@dataclass(frozen=True)
class InputSpec:
    """One sample's shape and dtype, the number of classes, and the data set it trains on."""
    shape: tuple[int, ...]
    num_classes: int
    dtype: torch.dtype = torch.float32
    dataset: str = "synthetic"  # "digits" or "synthetic"
    vocab_size: int = 0         # for integer token inputs


# -- digits ---------------------------------------------------------------------------------------
def digits_mlp() -> nn.Module:
    """A 3-layer perceptron for 8x8 digits (input 1x8x8, 10 classes)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128), nn.ReLU(),
        nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def wide_mlp() -> nn.Module:
    """A 784-1024-1024-1024-10 perceptron (MNIST-shaped inputs): wide Linear layers whose
    1024-sided factors make decompositions the cost."""
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 10),
    )


class DigitsCNN(nn.Module):
    """Two 3x3 conv layers, a max-pool and two linear layers for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.conv1(x).relu()
        x = self.pool(self.conv2(x).relu())
        x = self.fc1(x.flatten(1)).relu()
        return self.fc2(x)


# -- ResNets (He et al. 2016) ---------------------------------------------------------------------
class _CifarBasicBlock(nn.Module):
    """3x3-3x3 residual block; option-A shortcut (subsample and zero-pad channels)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 3x32x32 inputs: 16/32/64 channels, n blocks per stage."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(blocks_per_stage):
                stages.append(_CifarBasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck block (stride on the 3x3, as torchvision's ResNet v1.5)."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 for 3x224x224 ImageNet inputs: 53 conv layers and one linear (54 K-FAC layers)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for width, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(count):
                blocks.append(_Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# -- a BERT-like encoder built from nn.Linear -----------------------------------------------------
class _EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer with separate q, k, v, output and FFN nn.Linear layers,
    so K-FAC hooks see every projection (3-D inputs: tokens become rows)."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x):
        n, t, h = x.shape
        split = lambda y: y.view(n, t, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        attn = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                              split(self.value(x)))
        x = self.norm1(x + self.attn_out(attn.transpose(1, 2).reshape(n, t, h)))
        return self.norm2(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class BertLike(nn.Module):
    """A BERT-style encoder classifier over token ids: embeddings, `layers` encoder layers, a
    pooler and a classifier on the first token."""

    def __init__(self, *, vocab: int, hidden: int, layers: int, heads: int, ffn: int,
                 max_len: int, num_classes: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.encoder = nn.Sequential(*(_EncoderLayer(hidden, heads, ffn) for _ in range(layers)))
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.encoder(self.norm(self.tokens(ids) + self.positions(positions)))
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


BERT_MINI = dict(vocab=30522, hidden=256, layers=4, heads=4, ffn=1024, max_len=128, num_classes=2)


@dataclass(frozen=True)
class ZooEntry:
    """A built-in model: how to build it and what it eats."""
    factory: Callable[[], nn.Module]
    inputs: InputSpec


ZOO: dict[str, ZooEntry] = {
    "digits-mlp": ZooEntry(digits_mlp, InputSpec((1, 8, 8), 10, dataset="digits")),
    "digits-cnn": ZooEntry(DigitsCNN, InputSpec((1, 8, 8), 10, dataset="digits")),
    "mlp-1024": ZooEntry(wide_mlp, InputSpec((784,), 10)),
    "resnet20": ZooEntry(lambda: CifarResNet(3), InputSpec((3, 32, 32), 10)),
    "resnet32": ZooEntry(lambda: CifarResNet(5), InputSpec((3, 32, 32), 10)),
    "resnet50": ZooEntry(ResNet50, InputSpec((3, 224, 224), 1000)),
    "bert-mini": ZooEntry(lambda: BertLike(**BERT_MINI),
                          InputSpec((BERT_MINI["max_len"],), BERT_MINI["num_classes"],
                                    dtype=torch.long, vocab_size=BERT_MINI["vocab"])),
}

DEFAULT_MODEL = "digits-cnn"


def build_model(name: str) -> nn.Module:
    """Instantiate a zoo model or a user's `package.module:callable`; InputError for an unknown
    name, an unimportable module, a failing call or something that is not an nn.Module."""
    if name in ZOO:
        return ZOO[name].factory()
    if not is_callable_spec(name):
        raise InputError(f"unknown model {name!r}: expected one of {', '.join(sorted(ZOO))} "
                         "or package.module:callable")
    model = call_checked(load_callable(name, what="model"), what="model", spec=name)
    if not isinstance(model, nn.Module):
        raise InputError(f"model {name!r} returned {type(model).__name__}, not an nn.Module")
    return model
