"""Plain float64 references of SelectiveSSM and SerpentineBlock, written from the equations with
explicit loops over time steps, heads and snake paths. Only the modules' weights are read; none of
diffmodels.models.ssm / diffmodels.models.serpentine's functions is called, so the tests compare two
independent computations."""

from __future__ import annotations

import torch
from torch import Tensor


def _weights(module) -> dict[str, Tensor]:
    return {name: p.detach().double() for name, p in module.named_parameters()}


def silu(v: Tensor) -> Tensor:
    return v / (1 + torch.exp(-v))


def ssm_reference(layer, x: Tensor, z: Tensor | None = None) -> Tensor:
    """SelectiveSSM in float64, one time step at a time. x, z (b, l, d_inner) -> (b, l, d_inner).

        dt_t, B_t, C_t = x_t W^T split (heads, d_state, d_state);  dt_t = softplus(dt_t + dt_bias)
        per head k and channel c of that head (A_k = -exp(A_log_k)):
            h_t = exp(dt_t[k] A_k) h_{t-1} + dt_t[k] x_t[c] B_t          (h: d_state)
            y_t[c] = C_t . h_t + D_k x_t[c]
        y = y * silu(z) when gated
    """
    w = _weights(layer)
    x = x.double()
    b, l, d_inner = x.shape
    heads, n, p = layer.nheads, layer.d_state, layer.headdim
    proj = x @ w["x_proj.weight"].T  # (b, l, heads + 2n)
    dt = torch.log1p(torch.exp(proj[..., :heads] + w["dt_bias"]))  # softplus
    B, C = proj[..., heads : heads + n], proj[..., heads + n :]
    A = -torch.exp(w["A_log"])
    y = torch.zeros_like(x)
    for k in range(heads):
        xk = x[:, :, k * p : (k + 1) * p]  # (b, l, p): the channels of head k, one state row each
        h = torch.zeros(b, p, n, dtype=torch.float64)
        for t in range(l):
            decay = torch.exp(dt[:, t, k] * A[k])[:, None, None]
            h = decay * h + (dt[:, t, k, None] * xk[:, t])[:, :, None] * B[:, t, None, :]
            y[:, t, k * p : (k + 1) * p] = (h * C[:, t, None, :]).sum(-1) + w["D"][k] * xk[:, t]
    if z is not None:
        y = y * silu(z.double())
    return y


def snake_path(height: int, width: int, order: str) -> list[tuple[int, int]]:
    """The (row, col) cells of a ``<family>_<corner>[_rev]`` scan, built by walking the grid: lanes
    are rows (``rows``) or columns (``cols``), the first lane is the one at ``corner`` and runs away
    from it, each next lane runs back the other way; ``_rev`` walks the same path backwards."""
    family, corner, *rev = order.split("_")
    top, left = corner[0] == "t", corner[1] == "l"
    rows = list(range(height)) if top else list(range(height - 1, -1, -1))
    cols = list(range(width)) if left else list(range(width - 1, -1, -1))
    cells = []
    if family == "rows":
        for i, r in enumerate(rows):
            cells += [(r, c) for c in (cols if i % 2 == 0 else cols[::-1])]
    else:
        for i, c in enumerate(cols):
            cells += [(r, c) for r in (rows if i % 2 == 0 else rows[::-1])]
    assert sorted(cells) == [(r, c) for r in range(height) for c in range(width)]
    return cells[::-1] if rev else cells


def group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    g = (g - mean) / torch.sqrt(var + eps)
    return g.reshape(b, c, h, w) * weight[:, None, None] + bias[:, None, None]


def serpentine_reference(block, x: Tensor) -> Tensor:
    """SerpentineBlock in float64: x (B, C, H, W) -> x + branch(x), every stage written out.

        GroupNorm -> 1x1 in-projection to (u, z) -> u: depthwise 3x3 conv (zero padding), SiLU
        -> per scan order: u read along the snake path, the SSM (ungated), written back to the
        path's cells -> sum or mean over orders -> LayerNorm over channels, times SiLU(z)
        -> linear out-projection -> plus x
    """
    w = _weights(block)
    x = x.double()
    b, c, height, width = x.shape
    e = w["conv.weight"].shape[0]  # d_inner
    xn = group_norm(x, block.norm.num_groups, w["norm.weight"], w["norm.bias"], block.norm.eps)
    uz = torch.einsum("oc,bchw->bohw", w["in_proj.weight"][:, :, 0, 0], xn) + w["in_proj.bias"][:, None, None]
    u, z = uz[:, :e], uz[:, e:]
    padded = torch.zeros(b, e, height + 2, width + 2, dtype=torch.float64)
    padded[:, :, 1:-1, 1:-1] = u
    conv = w["conv.bias"][:, None, None].expand(b, e, height, width).clone()
    for di in range(3):
        for dj in range(3):
            tap = w["conv.weight"][:, 0, di, dj][:, None, None]
            conv = conv + tap * padded[:, :, di : di + height, dj : dj + width]
    u = silu(conv)

    merged = torch.zeros(b, height, width, e, dtype=torch.float64)
    for order in block.orders:
        cells = snake_path(height, width, order)
        seq = torch.stack([u[:, :, r, col] for r, col in cells], dim=1)  # (B, L, E) along the path
        out = ssm_reference(block.ssm, seq)
        for k, (r, col) in enumerate(cells):
            merged[:, r, col] += out[:, k]
    if block.merge == "mean":
        merged = merged / len(block.orders)
    mean = merged.mean(-1, keepdim=True)
    var = ((merged - mean) ** 2).mean(-1, keepdim=True)
    y = (merged - mean) / torch.sqrt(var + block.out_norm.eps) * w["out_norm.weight"] + w["out_norm.bias"]
    y = y * silu(z.permute(0, 2, 3, 1))  # (B, H, W, E)
    y = y @ w["out_proj.weight"].T + w["out_proj.bias"]  # (B, H, W, C)
    return x + y.permute(0, 3, 1, 2)
