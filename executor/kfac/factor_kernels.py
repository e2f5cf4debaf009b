"""The matrix kernels that build Kronecker factors from a batch: Gram matrices of row and
channel matrices with the mean's scale applied inside the product, a bias's ones added without
copying large inputs, and convolution patches taken once as columns. No full-size copies or
scalings of the patch and row matrices."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SMALL_ROWS = 1 << 16  # elements of a row matrix below which one copy beats assembling blocks


def mean_scale(count: int) -> float:
    """1 / count for a mean over `count` rows; NaN for none (an empty batch's factor is then
    not finite and is dropped and counted, like any other)."""
    return 1.0 / count if count else float("nan")


def scaled_mm(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * left @ right, the scale applied inside the matrix product (an empty inner
    dimension gives 0 * scale: NaN for a NaN scale)."""
    out = left.new_empty(left.shape[0], right.shape[1])
    if left.shape[1] == 0:
        return out.fill_(0.0 * scale)
    return torch.addmm(out, left, right, beta=0, alpha=scale)


def row_gram(rows: torch.Tensor, ones_column: bool, scale: float) -> torch.Tensor:
    """scale * rows^T rows for an (n, d) matrix, with a column of ones appended to `rows` when
    `ones_column`: (d+1) x (d+1) [[rows^T rows, column sums], [column sums^T, n]]. Copies
    `rows` beside a column of ones when that is no larger than the d x d product or small
    (under SMALL_ROWS elements), else assembles the blocks."""
    n, d = rows.shape
    if not ones_column:
        return scaled_mm(rows.t(), rows, scale)
    if n <= d or n * d < SMALL_ROWS:
        padded = torch.cat([rows, rows.new_ones(n, 1)], dim=1)
        return scaled_mm(padded.t(), padded, scale)
    sums = rows.sum(0).mul_(scale)
    out = rows.new_empty(d + 1, d + 1)
    out[:d, :d] = scaled_mm(rows.t(), rows, scale)
    out[:d, d] = sums
    out[d, :d] = sums
    out[d, d] = n * scale
    return out


def channel_gram(t: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * the sum over batch and positions of t[n, :, h, w] t[n, :, h, w]^T (channels x
    channels) for an (N, C, H, W) tensor; no copy when `t` is channels-last, one (C, N*H*W)
    copy otherwise."""
    channels = t.shape[1]
    if t.is_contiguous(memory_format=torch.channels_last):
        rows = t.permute(0, 2, 3, 1).reshape(-1, channels)
        return scaled_mm(rows.t(), rows, scale)
    cols = t.transpose(0, 1).reshape(channels, -1)
    return scaled_mm(cols, cols.t(), scale)


def patch_windows(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """Zero-padded convolution patches of an (N, C, H, W) input as a strided view
    (N, C, out_h, out_w, kernel_h, kernel_w), the same patches F.unfold extracts."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    return windows[..., ::dh, ::dw]


def patch_columns(windows: torch.Tensor, ones_row: bool) -> torch.Tensor:
    """The patches of `windows` (from patch_windows) as columns of one contiguous
    (C*kh*kw [+1], N*out_h*out_w) matrix, with a last row of ones when `ones_row`."""
    n, c, oh, ow, kh, kw = windows.shape
    d = c * kh * kw
    cols = windows.new_empty(d + int(ones_row), n * oh * ow)
    if ones_row:
        cols[d].fill_(1)
    cols[:d].view(c, kh, kw, n, oh, ow).copy_(windows.permute(1, 4, 5, 0, 2, 3))
    return cols
