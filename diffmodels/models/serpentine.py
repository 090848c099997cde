"""Serpentine scans: a feature map read as sequences along snake paths, mixed by a selective SSM.

A feature map (B, C, H, W) is flattened along several *scan orders*, each a permutation of the
H*W grid positions; one call of ``SelectiveSSM`` runs all of them (directions folded into the
batch), each result is put back on the grid and the directions are merged (docs/maths.md#serpentine-blocks; ZigMa,
Hu et al. 2024, and Vision Mamba, Zhu et al. 2024, scan images this way).

Scan orders are snake (boustrophedon) paths, so consecutive sequence positions are always grid
neighbours; a raster sweep would jump from the end of one row to the start of the next, and
ZigMa's ablations found it much worse. Names are ``<family>_<corner>[_rev]``:

    family  ``rows``: along a row, turn, back along the next row; ``cols``: the same by columns
    corner  where the path starts: ``tl``, ``tr``, ``bl``, ``br``
    _rev    the same path walked backwards (it ends where the plain path started)

The reverse of a path is itself the snake from its end corner (e.g. ``rows_tl_rev`` is
``rows_bl`` when H is even), so the 16 names give 8 distinct permutations; the ``_rev`` names
say which pairing a block uses. Index convention, for the row-major flat grid ``g`` (L = H*W):

    seq = g[perm]        g = seq[inv]        (perm[inv] = inv[perm] = arange(L))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffmodels.models.ssm import SelectiveSSM

FAMILIES = ("rows", "cols")
CORNERS = ("tl", "tr", "bl", "br")
ORDERS = tuple(f"{f}_{c}{r}" for f in FAMILIES for c in CORNERS for r in ("", "_rev"))
MERGES = ("sum", "mean")
DIRECTIONS = (1, 2, 4)


def _check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


@functools.lru_cache(maxsize=512)
def scan_indices(height: int, width: int, order: str) -> tuple[Tensor, Tensor]:
    """(perm, inv) for one scan order: CPU int64 tensors of shape (H*W,), computed once and cached.

    The cached tensors are shared: never modify them in place (``.to(device)`` copies).
    """
    _check_choice("scan order", order, ORDERS)
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1x1, got {height}x{width}")
    family, corner, *rev = order.split("_")
    n_outer, n_inner = (height, width) if family == "rows" else (width, height)
    # The corner fixes which end of the outer axis comes first and which way the first lane runs.
    outer_flip = corner[0] == "b" if family == "rows" else corner[1] == "r"
    inner_flip = corner[1] == "r" if family == "rows" else corner[0] == "b"
    outer = torch.arange(n_outer)
    if outer_flip:
        outer = outer.flip(0)
    inner = torch.arange(n_inner).repeat(n_outer, 1)  # (n_outer, n_inner), one lane per row
    turn = (torch.arange(n_outer) % 2 == 1) ^ inner_flip  # lanes walked backwards
    inner[turn] = inner[turn].flip(1)
    outer = outer[:, None].expand(n_outer, n_inner)
    row, col = (outer, inner) if family == "rows" else (inner, outer)
    perm = (row * width + col).flatten()
    if rev:
        perm = perm.flip(0)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return perm, inv


@functools.lru_cache(maxsize=512)
def _stacked_indices(height: int, width: int, orders: tuple[str, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """perm and inv of several orders stacked to (D, H*W), on ``device`` (one copy per device)."""
    perms, invs = zip(*(scan_indices(height, width, o) for o in orders))
    return torch.stack(perms).to(device), torch.stack(invs).to(device)


def scan(x: Tensor, orders: Sequence[str]) -> Tensor:
    """Grid to sequences: x (B, C, H, W) -> (B*D, C, H*W), row b*D + d read along ``orders[d]``.

    Channel-major, like the feature map: the SSM and its projections work on (batch, channels,
    length) without transposing. One ``gather`` forward and one backward (:class:`_Scan`).
    """
    b, c, h, w = x.shape
    perm, inv = _stacked_indices(h, w, tuple(orders), x.device)  # (D, L)
    return _Scan.apply(x.flatten(2), perm, inv)


class _Scan(torch.autograd.Function):
    """x (B, C, L) -> (B*D, C, L), sequence d = x read along perm[d]. The gradient of reading a
    permutation is reading the gradient along its inverse: a gather too, where autograd's own
    gather backward zero-fills a tensor and scatter-adds into it."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
        b, c, l = x.shape
        d = perm.size(0)
        ctx.save_for_backward(inv)
        seq = x.gather(2, perm.view(1, 1, -1).expand(b, c, -1))  # (B, C, D*L)
        return seq if d == 1 else seq.view(b, c, d, l).transpose(1, 2).reshape(b * d, c, l)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inv,) = ctx.saved_tensors
        d, l = inv.shape
        bd, c, _ = grad.shape
        if d == 1:
            return grad.gather(2, inv.expand(bd, c, l)), None, None
        grad = grad.view(bd // d, d, c, l)
        return grad.gather(3, inv.view(1, d, 1, l).expand(bd // d, d, c, l)).sum(1), None, None


def unscan(seq: Tensor, orders: Sequence[str], height: int, width: int) -> Tensor:
    """Sequences back to the grid: (B*D, C, H*W) -> (B, D, C, H*W), positions in row-major order."""
    bd, c, l = seq.shape
    d = len(orders)
    _, inv = _stacked_indices(height, width, tuple(orders), seq.device)  # (D, L)
    if d == 1:
        return seq.gather(2, inv.expand(bd, c, l)).view(bd, 1, c, l)
    offsets = (torch.arange(d, device=seq.device) * l)[:, None]
    seq = seq.view(bd // d, d, c, l).transpose(1, 2).reshape(bd // d, c, d * l)
    index = (inv + offsets).view(1, 1, -1).expand(bd // d, c, -1)
    return seq.gather(2, index).view(bd // d, c, d, l).transpose(1, 2)


def unscan_sum(seq: Tensor, orders: Sequence[str], height: int, width: int) -> Tensor:
    """Sequences back to the grid and summed over the orders: (B*D, C, H*W) -> (B, H*W, C).

    Position-major, for the per-position LayerNorm that follows in the block: the gather writes
    that layout directly, where ``unscan`` and a transpose would copy the result once more. Its
    backward is a gather as well (:class:`_UnscanSum`).
    """
    perm, inv = _stacked_indices(height, width, tuple(orders), seq.device)  # (D, L)
    return _UnscanSum.apply(seq, perm, inv)


class _UnscanSum(torch.autograd.Function):
    """seq (B*D, C, L) -> out (B, L, C), out[b, p] = sum_d seq[b*D + d, :, inv[d, p]]; so the
    gradient of seq[b*D + d, :, j] is grad[b, perm[d, j]]."""

    @staticmethod
    def forward(ctx, seq: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
        bd, c, l = seq.shape
        d = perm.size(0)
        ctx.save_for_backward(perm)
        seq = seq.view(bd // d, d, c, l).transpose(2, 3)  # (B, D, L, C), a view
        grid = seq.gather(2, inv.view(1, d, l, 1).expand(bd // d, d, l, c))
        return grid.sum(1) if d > 1 else grid.view(bd, l, c)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (perm,) = ctx.saved_tensors
        d, l = perm.shape
        b, _, c = grad.shape
        grad = grad.transpose(1, 2)[:, None].expand(b, d, c, l)  # (B, D, C, L), a view
        return grad.gather(3, perm.view(1, d, 1, l).expand(b, d, c, l)).view(b * d, c, l), None, None


def block_orders(family: str = "rows", directions: int = 2, corner: str = "tl") -> tuple[str, ...]:
    """The scan orders of one block: 1 = a path, 2 = path + reverse, 4 = both families + reverses."""
    _check_choice("family", family, FAMILIES)
    _check_choice("directions", directions, DIRECTIONS)
    _check_choice("corner", corner, CORNERS)
    other = FAMILIES[1 - FAMILIES.index(family)]
    orders = (f"{family}_{corner}", f"{family}_{corner}_rev", f"{other}_{corner}", f"{other}_{corner}_rev")
    return orders[:directions]


def default_family(index: int) -> str:
    """Family of the index-th serpentine block: blocks alternate rows, cols, rows, ..."""
    return FAMILIES[index % 2]


class SerpentineBlock(nn.Module):
    """Residual block: norm, in-projection, 3x3 depthwise conv, multi-direction SSM, merge, gate.

    x (B, C, H, W) -> same shape and dtype; any H, W >= 1. With ``directions >= 2`` every output
    position depends on every input position; with 1 the block is causal along its path (up to
    the conv's 3x3 reach).

    ``recompute_from``: from this many grid positions up (None: never), a forward with gradients
    keeps only the inputs of its three parts (x, the gate, the scanned sequences, the merged
    scans) and recomputes the rest in backward, the scan a group of chunks at a time: a peak below
    fused attention's, for 30-55% more time (docs/design.md#performance).
    """

    def __init__(
        self,
        channels: int,
        *,
        directions: int = 2,
        family: str = "rows",
        merge: str = "mean",
        d_state: int = 16,
        headdim: int = 64,
        chunk_size: int = 64,
        expand: int = 1,
        norm_groups: int = 32,
        corner: str = "tl",
        recompute_from: int | None = 1024,
    ) -> None:
        super().__init__()
        if recompute_from is not None and recompute_from < 1:
            raise ValueError(f"recompute_from must be a number of grid positions >= 1 or None, got {recompute_from}")
        self.recompute_from = recompute_from
        _check_choice("merge", merge, MERGES)
        if channels % norm_groups:
            raise ValueError(f"channels ({channels}) must be a multiple of norm_groups ({norm_groups})")
        self.orders = block_orders(family, directions, corner)
        self.merge = merge
        # A path and its reverse are one bidirectional scan of the path (ssd_scan), so the block
        # scans one sequence per family: ``paths`` are the orders without their reverses.
        self.bidirectional = directions >= 2
        self.paths = self.orders[::2] if self.bidirectional else self.orders
        # y = scale * (sum of the scans) + skip * D u summed over paths gives the mean (or sum)
        # over all directions, each of which carries its own D u term.
        per_path = 2 if self.bidirectional else 1
        self._scale, self._skip = (1 / directions, 1 / len(self.paths)) if merge == "mean" else (1.0, per_path)
        d_inner = expand * channels
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.in_proj = nn.Conv2d(channels, 2 * d_inner, 1)  # -> u (scanned) and z (gate)
        # Local mixing on the grid, before flattening: a 1-D conv over a snake sequence would mix
        # the last cell of a lane with the first of the next lane's reversed run at every turn.
        self.conv = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner)
        self.ssm = SelectiveSSM(d_inner, d_state=d_state, headdim=headdim, chunk_size=chunk_size)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        recompute = self.recomputes(h * w)
        # Recomputing, only the inputs of the three parts are kept for backward: x, z, the scanned
        # sequences and the merged scan; everything between them is recomputed there.
        part = functools.partial(checkpoint, use_reentrant=False) if recompute else _call
        u, z = part(self._inputs, x, recompute)
        y = self.ssm(scan(u, self.paths), bidirectional=self.bidirectional, scale=self._scale, skip=self._skip,
                     recompute=recompute)
        y = part(self._outputs, unscan_sum(y, self.paths, h, w), z)  # (B, L, C)
        return (x + y.transpose(1, 2).view(b, c, h, w)).to(x.dtype)

    def recomputes(self, positions: int) -> bool:
        """Whether a forward over this many grid positions keeps its intermediates for backward
        (False: the faster choice at small grids) or recomputes them there (True: from
        ``recompute_from`` positions up, with gradients on, where stored activations would
        outweigh attention's; docs/design.md#performance)."""
        return self.recompute_from is not None and positions >= self.recompute_from and torch.is_grad_enabled()

    def _inputs(self, x: Tensor, own_gate: bool = False) -> tuple[Tensor, Tensor]:
        """Norm, in-projection, conv: the sequence input u and the gate z, (B, E, H, W) each.
        ``own_gate``: z in its own storage, so that keeping it does not keep u's as well."""
        u, z = self.in_proj(self.norm(x)).chunk(2, dim=1)
        return F.silu(self.conv(u)), (z.clone() if own_gate else z)

    def _outputs(self, y: Tensor, z: Tensor) -> Tensor:
        """Output norm, gate and out-projection: (B, L, E) merged scans -> (B, L, C)."""
        return self.out_proj(self.out_norm(y) * F.silu(z.flatten(2).transpose(1, 2)))


def _call(fn, *args):
    return fn(*args)
