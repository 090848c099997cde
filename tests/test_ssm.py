"""The chunked SSD scan against the sequential loop, its gradients, the layer's causality, and the
layer against a float64 reference (tests/ssm_reference.py)."""

from __future__ import annotations

import pytest
import torch
from memory_support import saved_bytes
from ssm_reference import ssm_reference

from diffmodels.models.ssm import (
    SelectiveSSM,
    _chunk_states,
    _pass_states,
    _pass_states_backward,
    decay,
    selective_scan_reference,
    ssd_chunked_scan,
    ssd_scan,
)


def _inputs(b, l, h, p, n, *, dtype=torch.float64, seed=0, dt_range=(1e-3, 1.0)):
    """Random scan inputs: x, dt in dt_range (log-uniform), A in [-4, -0.1], B, C."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = torch.tensor(dt_range, dtype=torch.float64).log()
    x = torch.randn(b, l, h, p, generator=g, dtype=torch.float64)
    dt = torch.exp(lo + (hi - lo) * torch.rand(b, l, h, generator=g, dtype=torch.float64))
    A = -(0.1 + 3.9 * torch.rand(h, generator=g, dtype=torch.float64))
    B = torch.randn(b, l, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, l, n, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (x, dt, A, B, C))


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def _check(inputs, chunk_size, tol):
    y, state = ssd_chunked_scan(*inputs, chunk_size=chunk_size)
    y_ref, state_ref = selective_scan_reference(*(t.double() for t in inputs))
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert _rel(y, y_ref) < tol
    assert _rel(state, state_ref) < tol


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_equals_loop_float64(chunk_size):
    _check(_inputs(2, 150, 3, 4, 5), chunk_size, 1e-10)  # 150 is no multiple of 7 or 64


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_equals_loop_float32(chunk_size):
    _check(_inputs(2, 150, 3, 4, 5, dtype=torch.float32, seed=1), chunk_size, 1e-4)


def test_long_sequence_float32():
    _check(_inputs(1, 16_384, 2, 4, 4, dtype=torch.float32, seed=2, dt_range=(1e-3, 0.1)), 64, 1e-4)


def test_large_step_sizes():
    # dt up to 1e4 (dt * A down to -4e4) mixed with tiny dt: decays underflow to exactly 0, never
    # overflow, and sums of tiny log-decays after a huge one must not cancel away.
    x, dt, A, B, C = _inputs(2, 300, 3, 4, 5, dtype=torch.float32, seed=3, dt_range=(1e-4, 1e4))
    for t in (x, dt, B, C):
        t.requires_grad_(True)
    y, _ = ssd_chunked_scan(x, dt, A, B, C, chunk_size=64)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(t.grad).all() for t in (x, dt, B, C))
    _check((x.detach(), dt.detach(), A, B.detach(), C.detach()), 64, 1e-4)


def _bidirectional_reference(x, dt, A, B, C):
    """The loop forward plus the loop over the reversed sequence, flipped back (float64)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    forward, _ = selective_scan_reference(x, dt, A, B, C)
    backward, _ = selective_scan_reference(*(t.flip(1) for t in (x, dt)), A, *(t.flip(1) for t in (B, C)))
    return forward + backward.flip(1)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 200])
@pytest.mark.parametrize("dtype, dt_range, tol", [
    (torch.float64, (1e-3, 1.0), 1e-10),
    (torch.float32, (1e-3, 1.0), 1e-5),
    (torch.float32, (1e-4, 1e4), 1e-5),  # huge steps: decays underflow, sums must not cancel
])
def test_bidirectional_scan_is_the_loop_both_ways(chunk_size, dtype, dt_range, tol):
    """One quasiseparable pass = the causal scan plus the scan of the reversed sequence, mapped
    back, at an odd length (150: no multiple of any chunk) and for every chunk size."""
    inputs = _inputs(2, 150, 3, 4, 5, dtype=dtype, seed=7, dt_range=dt_range)
    y, state = ssd_chunked_scan(*inputs, chunk_size=chunk_size, bidirectional=True)
    assert state is None and y.dtype == dtype and torch.isfinite(y).all()
    assert _rel(y, _bidirectional_reference(*inputs)) < tol


def test_gradcheck_bidirectional_scan():
    inputs = [t.requires_grad_(True) for t in _inputs(1, 7, 2, 2, 2, seed=8, dt_range=(0.1, 1.0))]
    assert torch.autograd.gradcheck(lambda *a: ssd_chunked_scan(*a, chunk_size=3, bidirectional=True)[0], inputs)
    assert torch.autograd.gradcheck(lambda *a: ssd_chunked_scan(*a, chunk_size=8, bidirectional=True)[0], inputs)


def test_initial_state_carries_over():
    x, dt, A, B, C = _inputs(2, 100, 2, 3, 4, seed=4)
    y, state = ssd_chunked_scan(x, dt, A, B, C, chunk_size=16)
    y1, s1 = ssd_chunked_scan(x[:, :37], dt[:, :37], A, B[:, :37], C[:, :37], chunk_size=16)
    y2, s2 = ssd_chunked_scan(x[:, 37:], dt[:, 37:], A, B[:, 37:], C[:, 37:], 16, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, state, rtol=1e-12, atol=1e-12)


def test_gradcheck_chunked_scan():
    inputs = [t.requires_grad_(True) for t in _inputs(1, 5, 2, 2, 2, seed=5, dt_range=(0.1, 1.0))]
    assert torch.autograd.gradcheck(lambda *a: ssd_chunked_scan(*a, chunk_size=2), inputs)


def test_scan_stays_float32_under_autocast():
    inputs = _inputs(1, 70, 2, 4, 4, dtype=torch.bfloat16, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = ssd_chunked_scan(*inputs, chunk_size=16)
    assert y.dtype == state.dtype == torch.float32
    y_ref, _ = selective_scan_reference(*(t.double() for t in inputs))
    assert _rel(y, y_ref) < 1e-5  # bf16 arithmetic inside would give ~1e-2


def test_decay_flushes_only_negligible_factors():
    s = torch.tensor([0.0, -1.0, -40.0, -50.0, -float("inf")])
    assert decay(s).tolist() == [1.0, torch.exp(torch.tensor(-1.0)).item(), torch.exp(torch.tensor(-40.0)).item(), 0.0, 0.0]


@pytest.mark.parametrize("gated", [False, True])
def test_layer_is_causal(gated):
    torch.manual_seed(0)
    layer = SelectiveSSM(8, d_state=4, headdim=4, chunk_size=4).double()
    x = torch.randn(1, 11, 8, dtype=torch.float64, requires_grad=True)
    z = torch.randn(1, 11, 8, dtype=torch.float64, requires_grad=True) if gated else None
    for i in (0, 5, 10):
        (gx,) = torch.autograd.grad(_layer(layer, x, z)[0, i].sum(), x)
        reach = gx[0].abs().sum(-1)  # (l,) how much each input position moves output i
        assert (reach[: i + 1] > 0).all()
        assert (reach[i + 1 :] == 0).all()


def test_layer_rejects_headdim_not_dividing():
    with pytest.raises(ValueError, match="headdim"):
        SelectiveSSM(10, headdim=4)


def _layer(layer, x, z=None, **kw):
    """The layer on sequence-major (b, l, d) inputs (it works channel-major)."""
    return layer(x.transpose(1, 2), None if z is None else z.transpose(1, 2), **kw).transpose(1, 2)


def _perturbed(module, seed=1):
    """Trained-looking weights: D away from its init of 1, every parameter moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 64])
def test_layer_equals_a_float64_loop_over_time_heads_and_channels(gated, chunk_size):
    """Projection to dt, B, C; softplus; per-head decay; D skip; SiLU gate (tests/ssm_reference.py)."""
    torch.manual_seed(0)
    layer = _perturbed(SelectiveSSM(12, d_state=5, headdim=4, chunk_size=chunk_size))  # 3 heads
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 12, generator=g)  # 11: no multiple of the chunk
    z = torch.randn(2, 11, 12, generator=g) if gated else None
    with torch.no_grad():
        y = _layer(layer, x, z)
    ref = ssm_reference(layer, x, z)
    assert y.dtype == torch.float32
    assert _rel(y, ref) < 1e-5, _rel(y, ref)


def _channel_major(x, dt, A, B, C):
    """ssd_chunked_scan's (b, l, ...) inputs in ssd_scan's channel-major layout, as new leaves."""
    return [t.detach().clone().requires_grad_() for t in (x.permute(0, 2, 3, 1), dt.transpose(1, 2), A,
                                                          B.transpose(1, 2), C.transpose(1, 2))]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("chunk_size, length", [(7, 150), (16, 64), (64, 150), (200, 150)])
@pytest.mark.parametrize("dtype, dt_range, tol", [
    (torch.float64, (1e-3, 1.0), 1e-12),
    (torch.float32, (1e-3, 1.0), 1e-5),
    (torch.float32, (1e-4, 1e4), 1e-5),
])
def test_recomputed_scan_equals_the_stored_one(bidirectional, chunk_size, length, dtype, dt_range, tol):
    """The recomputing scan (chunk groups, hand-written state backward) gives the stored scan's
    output bit for bit and its gradients to rounding, with the skip term and an input scale, at
    an odd length and with huge steps; and both equal the float64 loop."""
    inputs = _inputs(2, length, 3, 4, 5, dtype=dtype, seed=11, dt_range=dt_range)
    D = torch.tensor([0.5, -1.0, 2.0], dtype=dtype, requires_grad=True)
    runs = []
    for recompute in (False, True):
        leaves = _channel_major(*inputs) + [D.detach().clone().requires_grad_()]
        y, _ = ssd_scan(*leaves[:5], chunk_size=chunk_size, bidirectional=bidirectional, input_scale=0.7,
                        D=leaves[5], recompute=recompute)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype))
        runs.append((y.detach(), [t.grad for t in leaves]))
    (y_stored, g_stored), (y_recomputed, g_recomputed) = runs
    assert torch.equal(y_recomputed, y_stored)
    for name, g, ref in zip(("x", "dt", "A", "B", "C", "D"), g_recomputed, g_stored):
        assert _rel(g, ref.double()) < tol, name
    x, dt, A, B, C = (t.double() for t in inputs)
    loop = _bidirectional_reference(x, dt, A, B, C) if bidirectional else selective_scan_reference(x, dt, A, B, C)[0]
    loop = 0.7 * loop + D.double().detach()[:, None] * x  # (b, l, h, p)
    assert _rel(y_recomputed.permute(0, 3, 1, 2), loop) < tol


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_recomputed_scan_over_several_chunk_groups(bidirectional):
    """30 steps in chunks of 2: 15 chunks, so several groups and a partial last chunk's padding."""
    x, dt, A, B, C = _channel_major(*_inputs(2, 29, 2, 2, 2, seed=12, dt_range=(0.1, 1.0)))
    D = torch.tensor([0.3, -0.8], dtype=torch.float64, requires_grad=True)

    def scan(*a):
        return ssd_scan(*a[:5], chunk_size=2, bidirectional=bidirectional, input_scale=0.5, D=a[5], recompute=True)[0]

    assert torch.autograd.gradcheck(scan, (x, dt, A, B, C, D))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_state_passing_backward_is_autograd_of_the_recurrence(bidirectional):
    x, dt, A, B, C = _channel_major(*_inputs(2, 40, 3, 4, 5, seed=13))
    a = (dt * A[:, None]).view(2, 3, 8, 5)
    xdt = (x * dt[:, :, None]).view(2, 3, 4, 8, 5).transpose(2, 3)
    states, chunk_decay = (t.detach().requires_grad_() for t in _chunk_states(a, xdt, B.view(2, 5, 8, 5).transpose(1, 2),
                                                                                bidirectional))
    h_in = _pass_states(states, chunk_decay, bidirectional, None)[0]
    d_h_in = torch.randn(h_in.shape, dtype=h_in.dtype, generator=torch.Generator().manual_seed(4))
    expected = torch.autograd.grad(h_in, (states, chunk_decay), d_h_in)
    got = _pass_states_backward(h_in.detach().clone(), chunk_decay.detach(), d_h_in.clone(), bidirectional)
    for g, ref in zip(got, expected):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)


def test_recomputed_scan_keeps_only_its_inputs_and_the_entering_states():
    """The memory claim itself: the stored scan keeps several x-sized tensors for backward, the
    recomputing one its inputs plus the states entering each chunk (here 2 n / Q = 0.5 of x)."""
    x, dt, A, B, C = _channel_major(*_inputs(2, 256, 2, 16, 4, dtype=torch.float32, seed=14))
    x_bytes = x.numel() * x.element_size()
    inputs_bytes = sum(t.numel() * t.element_size() for t in (x, dt, A, B, C))

    def run(recompute):
        return saved_bytes(lambda: ssd_scan(x, dt, A, B, C, chunk_size=16, bidirectional=True, recompute=recompute))

    stored, recomputed = run(False), run(True)
    assert stored > inputs_bytes + 4 * x_bytes
    assert recomputed <= inputs_bytes + 0.5 * x_bytes + 4096


def test_recomputed_scan_backward_inside_autocast_stays_float32():
    """Recomputation in backward must not run its matmuls in bf16 when backward is called inside
    an autocast region. (The stored scan's backward follows autocast there, as any autograd graph
    does; the project's loops call backward outside autocast, as PyTorch advises.)"""
    inputs = _inputs(2, 100, 2, 4, 3, dtype=torch.float32, seed=15)

    def grads(recompute, autocast):
        leaves = _channel_major(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, _ = ssd_scan(*leaves, chunk_size=16, bidirectional=True, recompute=recompute)
            y.backward(torch.ones_like(y))
        return [t.grad for t in leaves]

    for g, ref in zip(grads(True, True), grads(False, False)):
        assert g.dtype == torch.float32 and _rel(g, ref.double()) < 1e-5  # bf16 would give ~3e-3
