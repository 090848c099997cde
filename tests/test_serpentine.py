"""Snake scan orders (permutations, continuity, scan-unscan identity) and the SerpentineBlock."""

from __future__ import annotations

import pytest
import torch
from memory_support import saved_bytes
from ssm_reference import serpentine_reference, snake_path
from torch import nn

from diffmodels.models.serpentine import (
    ORDERS,
    SerpentineBlock,
    block_orders,
    default_family,
    scan,
    scan_indices,
    unscan,
    unscan_sum,
)

SIZES = [(1, 1), (1, 7), (5, 3), (8, 8), (7, 12)]


@pytest.mark.parametrize("size", SIZES)
def test_scan_then_unscan_is_identity(size):
    h, w = size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    seq = scan(x, ORDERS)  # (2 * 16, 3, L)
    grid = unscan(seq, ORDERS, h, w)  # (2, 16, 3, L)
    raster = x.flatten(2)  # (2, 3, L)
    assert torch.equal(grid, raster[:, None].expand_as(grid))
    for d, order in enumerate(ORDERS):  # and each sequence really is the grid read along its path
        perm, _ = scan_indices(h, w, order)
        assert torch.equal(seq.view(2, len(ORDERS), 3, h * w)[:, d], raster[:, :, perm])
    for order in ORDERS:  # one order alone takes the same path
        assert torch.equal(scan(x, [order]), raster[:, :, scan_indices(h, w, order)[0]])
        assert torch.equal(unscan(scan(x, [order]), [order], h, w)[:, 0], raster)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("orders", [ORDERS[:1], ORDERS[::2][:2], ORDERS])
def test_unscan_sum_is_unscan_summed_over_orders_position_major(size, orders):
    h, w = size
    seq = torch.randn(3 * len(orders), 5, h * w, generator=torch.Generator().manual_seed(1))
    got = unscan_sum(seq, orders, h, w)  # (3, L, 5)
    assert got.shape == (3, h * w, 5) and got.is_contiguous()
    assert torch.allclose(got, unscan(seq, orders, h, w).sum(1).transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("orders", [ORDERS[:1], ORDERS[::2][:2], ORDERS[:3]])
def test_scan_and_unscan_sum_gradients_are_those_of_plain_gathers(size, orders):
    """Both hand-written backwards (gathers along the inverse permutations) equal autograd's
    gradient of the same reads done with index_select, and pass gradcheck."""
    h, w = size
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, h, w, dtype=torch.float64, generator=g, requires_grad=True)
    seq = torch.randn(2 * len(orders), 3, h * w, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: scan(t, orders), (x,))
    assert torch.autograd.gradcheck(lambda t: unscan_sum(t, orders, h, w), (seq,))
    perms = [scan_indices(h, w, o)[0] for o in orders]
    invs = [scan_indices(h, w, o)[1] for o in orders]
    plain_scan = torch.stack([x.flatten(2).index_select(2, p) for p in perms], 1).flatten(0, 1)
    w_seq = torch.randn_like(plain_scan)
    (ours,) = torch.autograd.grad((scan(x, orders) * w_seq).sum(), x)
    (plain,) = torch.autograd.grad((plain_scan * w_seq).sum(), x)
    assert torch.allclose(ours, plain)
    by_order = seq.view(2, len(orders), 3, h * w)
    plain_unscan = sum(by_order[:, i].index_select(2, inv) for i, inv in enumerate(invs)).transpose(1, 2)
    w_grid = torch.randn_like(plain_unscan)
    (ours,) = torch.autograd.grad((unscan_sum(seq, orders, h, w) * w_grid).sum(), seq)
    (plain,) = torch.autograd.grad((plain_unscan * w_grid).sum(), seq)
    assert torch.allclose(ours, plain)


@pytest.mark.parametrize("size", SIZES)
def test_every_order_is_a_permutation_with_its_inverse(size):
    h, w = size
    identity = torch.arange(h * w)
    for order in ORDERS:
        perm, inv = scan_indices(h, w, order)
        assert perm.dtype == inv.dtype == torch.int64
        assert torch.equal(perm.sort().values, identity)
        assert torch.equal(perm[inv], identity) and torch.equal(inv[perm], identity)


@pytest.mark.parametrize("size", SIZES)
def test_snake_paths_step_between_grid_neighbours(size):
    h, w = size
    for order in ORDERS:
        perm, _ = scan_indices(h, w, order)
        row, col = perm // w, perm % w
        manhattan = (row.diff().abs() + col.diff().abs()).tolist()
        assert manhattan == [1] * (h * w - 1), order


def test_orders_start_at_their_corner_and_follow_their_family():
    h, w = 5, 4
    corners = {"tl": 0, "tr": w - 1, "bl": (h - 1) * w, "br": h * w - 1}
    for order in ORDERS:
        family, corner, *rev = order.split("_")
        perm, _ = scan_indices(h, w, order)
        if rev:
            perm = perm.flip(0)
        assert perm[0] == corners[corner], order
        # first lane: a whole row for "rows", a whole column for "cols"
        lane = perm[:w] // w if family == "rows" else perm[:h] % w
        assert (lane == lane[0]).all(), order


def test_indices_are_cached_and_bad_names_rejected():
    assert scan_indices(5, 3, "cols_br")[0] is scan_indices(5, 3, "cols_br")[0]
    with pytest.raises(ValueError, match="rows_tl"):
        scan_indices(5, 3, "raster")


def test_block_orders_and_family_alternation():
    assert block_orders("rows", 2) == ("rows_tl", "rows_tl_rev")
    assert block_orders("cols", 4) == ("cols_tl", "cols_tl_rev", "rows_tl", "rows_tl_rev")
    assert [default_family(i) for i in range(4)] == ["rows", "cols", "rows", "cols"]
    with pytest.raises(ValueError, match="directions"):
        block_orders("rows", 3)


def _block(**kwargs) -> SerpentineBlock:
    torch.manual_seed(0)
    kwargs = {"d_state": 4, "headdim": 4, "chunk_size": 8, "norm_groups": 2, **kwargs}
    return SerpentineBlock(8, **kwargs)


def _perturbed(block: SerpentineBlock) -> SerpentineBlock:
    """Trained-looking weights: norms' affine terms and D away from 1 and 0, every parameter moved."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return block


def test_reference_snake_paths_are_the_scan_orders():
    """The test's own path builder (tests/ssm_reference.py) agrees with scan_indices on every order."""
    for h, w in SIZES:
        for order in ORDERS:
            perm, _ = scan_indices(h, w, order)
            assert perm.tolist() == [r * w + c for r, c in snake_path(h, w, order)], (h, w, order)
    assert snake_path(2, 3, "rows_br") == [(1, 2), (1, 1), (1, 0), (0, 0), (0, 1), (0, 2)]
    assert snake_path(3, 2, "cols_tr_rev") == [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (0, 1)]


@pytest.mark.parametrize("directions,family,merge,corner", [(1, "rows", "sum", "tl"), (2, "cols", "mean", "br"),
                                                            (4, "rows", "mean", "tr"), (4, "cols", "sum", "bl")])
def test_block_equals_a_float64_reference_and_every_parameter_gets_gradient(directions, family, merge, corner):
    """Norm, in-projection, depthwise conv, per-direction snake scans through the SSM, un-permute,
    merge, LayerNorm, gate, out-projection and residual, all written out in float64."""
    block = _perturbed(_block(directions=directions, family=family, merge=merge, corner=corner))
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(2))  # 35 cells: no multiple of chunk 8
    y = block(x)
    assert y.dtype == x.dtype
    ref = serpentine_reference(block, x)
    branch, ref_branch = (y - x).double(), ref - x.double()
    assert ((branch - ref_branch).norm() / ref_branch.norm()).item() < 1e-5
    y.backward(torch.randn_like(y))
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_block_keeps_shape_and_dtype_under_bf16_autocast():
    block = _block(directions=4)
    x = torch.randn(2, 8, 7, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()


def _reach(block: SerpentineBlock, h: int, w: int, position: int) -> torch.Tensor:
    """(H*W,) bool: which input grid positions move the output at raster ``position``."""
    block.norm = nn.Identity()  # GroupNorm statistics would couple every position to every other
    x = torch.randn(1, 8, h, w, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(block.double()(x).flatten(2)[0, :, position].sum(), x)
    return g[0].abs().sum(0).flatten() > 0


def test_one_direction_is_causal_along_its_path():
    h, w = 5, 6
    perm, _ = scan_indices(h, w, "rows_tl")
    for i in (0, 9, 29):  # output at the i-th position of the path
        # inputs feed the scan through the 3x3 conv: position q reaches the path cells around it
        seen = torch.zeros(h + 2, w + 2, dtype=torch.bool)
        for q in perm[: i + 1].tolist():
            seen[q // w : q // w + 3, q % w : q % w + 3] = True
        expected = seen[1:-1, 1:-1].flatten()
        reach = _reach(_block(directions=1, family="rows"), h, w, perm[i].item())
        assert torch.equal(reach, expected), i


def test_path_and_reverse_see_the_whole_grid():
    h, w = 5, 6
    for position in (0, 14, 29):  # start of the path, the middle, the end
        assert _reach(_block(directions=2), h, w, position).all()


@pytest.mark.parametrize("directions", [1, 2, 4])
def test_float64_block_is_float64_throughout(directions):
    """A float64 block equals the float64 reference to float64 rounding: no parameter (A, dt, D)
    passes through float32 on the way, which the float32 test above could not see."""
    block = _perturbed(_block(directions=directions)).double()
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    branch, ref_branch = block(x) - x, serpentine_reference(block, x) - x
    assert ((branch - ref_branch).norm() / ref_branch.norm()).item() < 1e-12


@pytest.mark.parametrize("directions", [1, 2, 4])
def test_recomputing_block_equals_the_storing_one(directions):
    """From ``recompute_from`` positions up a training forward keeps only the inputs of its parts
    and recomputes the rest in backward: the same output and gradients, to float32 rounding (the
    gate reads a copy of z, which elementwise kernels may take another vector path through)."""
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(4))  # 35 cells, chunks of 8
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    runs = []
    for recompute_from in (None, 35):
        block = _perturbed(_block(directions=directions, recompute_from=recompute_from))
        assert block.recomputes(35) == (recompute_from is not None) and not block.recomputes(34)
        leaf = x.clone().requires_grad_()
        y = block(leaf)
        y.backward(grad)
        runs.append((y.detach(), leaf.grad, {n: p.grad for n, p in block.named_parameters()}))
    (y0, gx0, gp0), (y1, gx1, gp1) = runs
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for name in gp0:
        torch.testing.assert_close(gp1[name], gp0[name], rtol=1e-5, atol=1e-6, msg=name)


def test_recomputing_block_keeps_a_few_activations_for_backward():
    """What autograd keeps for backward, in units of the block input: the storing block keeps over
    ten, the recomputing one the gate, the scanned sequences, their dt/B/C projection (here the
    same size), the merged scans and the entering states (half): 4.5; without gradients nothing
    recomputes."""
    x = torch.randn(2, 32, 32, 32, requires_grad=True)
    unit = x.numel() * x.element_size()

    def saved(recompute_from):
        block = SerpentineBlock(32, d_state=16, headdim=32, chunk_size=64, recompute_from=recompute_from)
        # activations, not weights or indices, nor the input (which the caller holds anyway)
        return saved_bytes(lambda: block(x), ignore=(x,), min_numel=1024) / unit

    assert saved(None) > 10
    assert saved(1024) < 5
    assert SerpentineBlock(32, d_state=16, headdim=32).recomputes(1024)
    with torch.no_grad():
        assert not SerpentineBlock(32, d_state=16, headdim=32).recomputes(10**6)
    with pytest.raises(ValueError, match="recompute_from"):
        SerpentineBlock(32, recompute_from=0)
