"""Selective state-space layer with the chunked state-space-duality (SSD) scan of Mamba-2.

Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality" (arXiv:2405.21060). Per head, with a *scalar* decay a_t:

    h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T        (state h_t: P x N, eq. 1 / sec. 6)
    y_t = h_t C_t + D x_t

Names in code -> symbols in the paper:
    x        (b, l, h, p)  X, the input sequence split into heads of size P (= headdim)
    dt       (b, l, h)     Delta, the input-dependent step size (softplus, always > 0)
    A        (h,)          A, one negative scalar per head (A = -exp(A_log))
    a        ... = dt * A  log of the per-step decay a_t (<= 0), so decays exp(a) lie in (0, 1]
    B, C     (b, l, n)     B, C, input-dependent, shared by all heads (Mamba-2's ngroups = 1)
    L        (.., Q, Q)    L = exp(segsum(a)), the 1-semiseparable decay mask (sec. 6, "ssd_minimal")
    Q                      chunk length (the paper's block length T)
    states   (b, h, c, p, n) the state each chunk would leave behind from zero (step 2 of sec. 6)
    D        (h,)          the skip term

The chunked scan (``ssd_chunked_scan``) follows the four steps of sec. 6 / Listing 1: (1) within
a chunk, a masked attention-like product (C B^T * L) X; (2) each chunk's own final state;
(3) a short sequential recurrence over chunk states (l / Q steps, so cost stays linear in l);
(4) the contribution of the state entering each chunk. It needs no custom autograd. Every log-decay
sum is a cumulative sum of non-positive terms taken directly (never a difference of two large
cumulative sums, which would cancel catastrophically when a step size is huge), and only
non-positive numbers are exponentiated, so large dt underflows to 0 instead of overflowing.

``selective_scan_reference`` is the same recurrence as a plain loop over time: slow, obviously
correct, and usable in float64 as the test oracle.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def segsum(a: Tensor) -> Tensor:
    """Segment sums: out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, -inf above.

    a (..., Q) -> (..., Q, Q). exp(segsum(a)) is the lower-triangular decay mask L; the diagonal
    is exp(0) = 1 and the upper triangle exp(-inf) = 0. Computed as a masked cumulative sum so that
    each entry sums only its own segment (no cancellation, unlike cumsum[i] - cumsum[j]).
    """
    Q = a.size(-1)
    a = a[..., None].expand(*a.shape, Q)  # (..., Q, Q): a[..., i, j] = a_i
    strictly_lower = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(a, dim=-2)  # out[i, j] = sum_{j < k <= i} a_k
    lower = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~lower, -math.inf)


def decay(s: Tensor) -> Tensor:
    """exp(s) for log-decays s <= 0, with results below sqrt(smallest normal) set to exactly 0.

    Such factors are far below rounding error (1e-19 in float32, 1e-154 in float64), but left in
    place they turn into subnormal numbers, which make CPU matmuls over ten times slower.
    Flushing at the square root keeps products of two factors normal as well.
    """
    return torch.exp(s.masked_fill(s < _floor(s.dtype), -math.inf))


def _scan_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64 (the oracle comparisons); everything lower is computed in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def ssd_chunked_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    bidirectional: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Chunked SSD scan (Mamba-2, sec. 6) in the sequence-major layout, linear in the length l.

    x (b, l, h, p), dt (b, l, h) > 0, A (h,) < 0, B and C (b, l, n), initial_state (b, h, p, n).
    Returns y (b, l, h, p) without the D skip term, and the final state (b, h, p, n); with
    ``bidirectional`` y is the forward scan plus the scan of the reversed sequence (each with its
    own diagonal term) and the state is None. A thin wrapper of :func:`ssd_scan` for callers that
    hold (b, l, ...) tensors.
    """
    y, state = ssd_scan(x.permute(0, 2, 3, 1), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                        chunk_size=chunk_size, initial_state=initial_state, bidirectional=bidirectional,
                        return_state=not bidirectional)
    return y.permute(0, 3, 1, 2), state


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 64,
    bidirectional: bool = False,
    input_scale: float = 1.0,
    initial_state: Tensor | None = None,
    return_state: bool = False,
    D: Tensor | None = None,
    recompute: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The SSD scan in the channel-major layout the serpentine block holds its features in.

    x (b, h, p, l), dt (b, h, l) > 0, A (h,) < 0, B and C (b, n, l); initial_state (b, h, p, n),
    causal scans only. Returns y (b, h, p, l) times ``input_scale``, plus the skip term D x where
    D (h,) is given; and
    the final state (b, h, p, n) when ``return_state`` (causal scans only), else None. y and the
    state are float32 (float64 for float64 inputs) whatever the input dtype or autocast state.

    ``bidirectional``: y is the causal scan of the sequence plus the causal scan of its reverse
    mapped back, computed as one quasiseparable matrix (Hydra, Hwang et al. 2024): inside a chunk
    the forward decays fill the lower triangle of one Q x Q mask and the backward decays its upper
    triangle (the diagonal, which both scans contain, is counted twice), so one masked product
    serves both directions; between chunks a forward and a backward state are passed in one loop.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if bidirectional and (initial_state is not None or return_state):
        raise ValueError("a bidirectional scan has no initial or final state")
    dtype = _scan_dtype(x.dtype)
    # Autocast would run the matmuls below in bf16/fp16; the decays exp(sum a) need float32.
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
        l = x.size(-1)
        Q = min(chunk_size, l)  # a sequence shorter than a chunk is one chunk: no padding work
        if D is not None:
            D = D.to(dtype)
        if recompute and initial_state is None and not return_state and torch.is_grad_enabled():
            return _RecomputedScan.apply(x, dt, A, B, C, D, Q, bidirectional, input_scale), None
        a, xdt, B, C = _chunked(x, dt, A, B, C, Q, input_scale)
        h_in = state = None
        if a.size(2) > 1 or initial_state is not None or return_state:
            h_in, state = _entering_states(a, xdt, B, bidirectional, initial_state)
        y = _unchunked(_chunk_outputs(a, xdt, B, C, h_in, bidirectional), l)
        if D is not None:
            y = y + D[:, None, None] * x
    return y, (state if return_state else None)


def _chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor | None, Q: int, input_scale: float):
    """The scan's inputs cut into chunks of Q: log-decays a (b, h, c, Q), dt x (b, h, c, p, Q),
    B and C (b, c, n, Q; C None stays None). A last partial chunk is padded with dt = 0: decay exp(0) = 1 and input
    dt x = 0, so a state passes through unchanged in either direction (the padded outputs are cut
    off by :func:`_unchunked`)."""
    b, h, p, l = x.shape
    n = B.size(1)
    pad = (-l) % Q
    if pad:
        x, dt, B, C = (None if t is None else F.pad(t, (0, pad)) for t in (x, dt, B, C))
    c = (l + pad) // Q
    a = (dt * A[:, None]).view(b, h, c, Q)  # log-decays, <= 0
    xdt = x * (dt if input_scale == 1.0 else dt * input_scale)[:, :, None]  # (b, h, p, L)
    # (b, h, c, p, Q), contiguous: both matmuls of a chunk would otherwise each copy (and save) it
    xdt = xdt.view(b, h, p, c, Q).transpose(2, 3).contiguous()
    B, C = (None if t is None else t.view(b, n, c, Q).transpose(1, 2) for t in (B, C))
    return a, xdt, B, C


def _unchunked(y: Tensor, l: int) -> Tensor:
    """(b, h, c, p, Q) chunk outputs -> (b, h, p, l), the padding cut off."""
    b, h, c, p, Q = y.shape
    return y.transpose(2, 3).reshape(b, h, p, c * Q)[..., :l]


def _entering_states(a: Tensor, xdt: Tensor, B: Tensor, bidirectional: bool, initial_state: Tensor | None):
    """Steps 2 and 3: the state entering each chunk, h_in (b, h, c, p, k, n) with k = 2 for a
    bidirectional scan (forward and backward state) else 1, and the final forward state (b, h, p, n).

    Both work on one state per chunk (c of them), so they cost little next to the Q x Q products.
    """
    return _pass_states(*_chunk_states(a, xdt, B, bidirectional), bidirectional, initial_state)


def _chunk_states(a: Tensor, xdt: Tensor, B: Tensor, bidirectional: bool) -> tuple[Tensor, Tensor]:
    """Step 2, each chunk on its own: the states it leaves behind from a zero start (b, h, c, p, k, n),
    the forward one at its last position (decays P_{Q-1} - P_j), the backward one at its first
    (decays R_j); and its whole decay exp(a_0 + .. + a_{Q-1}) (b, h, c, 1)."""
    n = B.size(-2)
    dtype = xdt.dtype
    P, R = _prefix_sums(a)
    total = P[..., -1:]  # (b, h, c, 1) log-decay over the whole chunk
    to_end = [decay((total - P).to(dtype))] + ([decay(R.to(dtype))] if bidirectional else [])
    Bd = torch.cat([B[:, None] * d[..., None, :] for d in to_end], dim=-2)  # (b, h, c, k*n, Q)
    states = (xdt @ Bd.transpose(-1, -2)).unflatten(-1, (len(to_end), n))  # (b, h, c, p, k, n)
    return states, decay(total.to(dtype))


def _pass_states(states: Tensor, chunk_decay: Tensor, bidirectional: bool, initial_state: Tensor | None):
    """Step 3: states passed from chunk to chunk; the backward states run over the chunks reversed.
    (h_in, final forward state), as :func:`_entering_states`."""
    b, h, c, p, k, n = states.shape
    states, chunk_decay = _run_order(states, bidirectional), _stream_decays(chunk_decay, bidirectional)
    carry = states.new_zeros(b, h, p, k, n)
    if initial_state is not None:
        carry[..., 0, :] = initial_state.to(states.dtype)
    entering = []
    # unbind once: indexing states[:, :, k] in the loop would make backward O(c^2)
    for decay_k, states_k in zip(chunk_decay.unbind(2), states.unbind(2)):
        entering.append(carry)
        carry = decay_k * carry + states_k
    return _run_order(torch.stack(entering, dim=2), bidirectional), carry[..., 0, :]


def _pass_states_backward(h_in: Tensor, chunk_decay: Tensor, d_h_in: Tensor, bidirectional: bool):
    """Gradients of :func:`_pass_states` (no initial state, final state unused) by the reverse
    recurrence: with carry_{i+1} = d_i carry_i + s_i and g_i the gradient of carry_i,
    ds_i = g_{i+1}, dd_i = <g_{i+1}, carry_i> and g_i = dh_in_i + d_i g_{i+1} (g_c = 0).
    Returns (d states, d chunk_decay) without building a graph over all chunks. Overwrites
    h_in and d_h_in (put in run order in place, so that no copies of them are made)."""
    entering, d_entering = _run_order_(h_in, bidirectional), _run_order_(d_h_in, bidirectional)
    decays = _stream_decays(chunk_decay, bidirectional)  # (b, h, c, 1, k, 1)
    b, h, c, p, k, n = entering.shape
    d_states = torch.empty_like(entering)
    d_decays = torch.empty_like(decays)
    g = entering.new_zeros(b, h, p, k, n)
    for i in reversed(range(c)):
        d_states[:, :, i] = g
        d_decays[:, :, i] = (g * entering[:, :, i]).sum((-3, -1), keepdim=True)
        g = d_entering[:, :, i] + decays[:, :, i] * g
    d_decays = d_decays[..., 0]  # (b, h, c, 1, k)
    d_decay = d_decays[..., 0] + (d_decays[..., 1].flip(2) if bidirectional else 0)
    return _run_order_(d_states, bidirectional), d_decay


def _run_order_(t: Tensor, bidirectional: bool) -> Tensor:
    """:func:`_run_order` in place."""
    if bidirectional:
        t[..., 1, :] = t[..., 1, :].flip(2)
    return t


def _run_order(t: Tensor, bidirectional: bool) -> Tensor:
    """Per-chunk (b, h, c, p, k, n) tensors in the order step 3 runs them: the backward states
    (k = 1) over the chunks reversed. Its own inverse."""
    return torch.cat([t[..., :1, :], t[..., 1:, :].flip(2)], dim=-2) if bidirectional else t


def _stream_decays(chunk_decay: Tensor, bidirectional: bool) -> Tensor:
    """(b, h, c, 1) chunk decays -> (b, h, c, 1, k, 1), the backward stream's over the chunks reversed."""
    if bidirectional:
        return torch.stack([chunk_decay, chunk_decay.flip(2)], dim=-1)[..., None]
    return chunk_decay[..., None, None]


def _chunk_outputs(a: Tensor, xdt: Tensor, B: Tensor, C: Tensor, h_in: Tensor | None, bidirectional: bool) -> Tensor:
    """Steps 1 and 4 for any run of chunks (each chunk on its own, given the state entering it):
    y (b, h, c, p, Q). ``h_in`` None: no state enters (a single chunk from a zero start)."""
    # 1. within chunks: y_i = sum_j (C_i . B_j) exp(segment sum of a) dt_j x_j, one masked product.
    mask = DecayMask.apply(a, bidirectional)  # (b, h, c, Q, Q)
    CB = C.transpose(-1, -2) @ B  # (b, c, Q, Q): C_i . B_j
    W = CB[:, None] * mask  # (b, h, c, Q, Q)
    if bidirectional:
        W.diagonal(dim1=-2, dim2=-1).mul_(2)  # the diagonal belongs to both scans
    y = xdt @ W.transpose(-1, -2)  # (b, h, c, p, Q)
    if h_in is None:
        return y
    # 4. entering states to outputs: forward decays a_0 + .. + a_i = P_i, backward a_i + .. + a_{Q-1}.
    P, R = _prefix_sums(a)
    dtype = xdt.dtype
    from_edge = [decay(P.to(dtype))] + ([decay((P[..., -1:] - R).to(dtype))] if bidirectional else [])
    Cd = torch.cat([C[:, None] * d[..., None, :] for d in from_edge], dim=-2)  # (b, h, c, k*n, Q)
    return y + h_in.flatten(-2) @ Cd


# Chunk groups of the recomputed scan, whose Q x Q tensors exist for one group at a time: up to
# RECOMPUTE_GROUPS of them, each of at least GROUP_MIN_CHUNKS chunks over all sequences and heads
# (every group costs a fixed number of operations, so small scans are cut into fewer).
RECOMPUTE_GROUPS = 4
GROUP_MIN_CHUNKS = 16


class _RecomputedScan(torch.autograd.Function):
    """ssd_scan for training at long lengths: saves only its inputs, and recomputes the rest in
    backward one group of chunks at a time (activation checkpointing by chunk groups).

    The stored scan keeps about ten tensors the size of x for backward (the Q x Q masks and
    products of step 1, the chunked inputs, the states). This one keeps its inputs and the
    states entering the chunks (k n / Q times the size of x); its backward holds the tensors
    of one chunk group at a time (:func:`_chunk_groups`):

    1. the states entering each chunk (h_in), kept from forward;
    2. steps 1 and 4 of each group, with autograd on that group's inputs alone: their gradients
       and that of h_in;
    3. the gradient of h_in back through step 3 (:func:`_pass_states_backward`), then through
       step 2 of each group.

    The forward value is the stored scan's bit for bit; gradients agree to rounding (the same
    terms, summed in another order).
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, Q, bidirectional, input_scale):
        ctx.Q, ctx.bidirectional, ctx.input_scale = Q, bidirectional, input_scale
        a, xdt, Bc, Cc = _chunked(x, dt, A, B, C, Q, input_scale)
        h_in = chunk_decay = None
        if a.size(2) > 1:
            states, chunk_decay = _chunk_states(a, xdt, Bc, bidirectional)
            h_in = _pass_states(states, chunk_decay, bidirectional, None)[0]
        # the entering states are kept: small (one per chunk), and backward needs them throughout
        ctx.save_for_backward(x, dt, A, B, C, D, h_in, chunk_decay)
        inner = (a, xdt, Bc, Cc, h_in)
        y = torch.cat([_chunk_outputs(*_group(inner, chunks), bidirectional)
                       for chunks in _chunk_groups(a.size(2), a.size(0) * a.size(1))], dim=2)
        y = _unchunked(y, x.size(-1))
        return y if D is None else y + D[:, None, None] * x

    @staticmethod
    def backward(ctx, grad):
        # float32 recomputation as in forward, even where backward runs inside an autocast region
        with torch.autocast(device_type=grad.device.type, enabled=False):
            return _RecomputedScan._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        x, dt, A, B, C, D, h_in, chunk_decay = ctx.saved_tensors
        Q, bidirectional, scale = ctx.Q, ctx.bidirectional, ctx.input_scale
        groups = _chunk_groups(-(-x.size(-1) // Q), x.size(0) * x.size(1))
        A = A.detach().requires_grad_()  # one leaf for all groups; its gradient is summed
        # the skip term D x first: its gradient starts the one of x
        dx = torch.zeros_like(x) if D is None else grad * D[:, None, None]
        dD = None if D is None else (grad * x).sum((0, 2, 3))
        d = {"x": dx, "dt": torch.zeros_like(dt), "A": torch.zeros_like(A), "B": torch.zeros_like(B), "C": torch.zeros_like(C)}

        def positions(t: Tensor, chunks: slice) -> Tensor:
            return t[..., chunks.start * Q:chunks.stop * Q]

        def leaves(chunks: slice, *names: str) -> dict[str, Tensor]:
            """The positions of a chunk group of the named inputs, as leaves of a new graph."""
            given = {"x": x, "dt": dt, "B": B, "C": C}
            return {k: A if k == "A" else positions(given[k].detach(), chunks).requires_grad_() for k in names}

        def collect(chunks: slice, inputs: dict[str, Tensor], outputs, grad_outputs) -> list[Tensor]:
            """Gradients of the group's inputs added to the totals; those of any extra leaves returned."""
            names = [k for k in inputs if k in d]
            grads = torch.autograd.grad(outputs, list(inputs.values()), grad_outputs)
            for k, g in zip(names, grads):
                (d[k] if k == "A" else positions(d[k], chunks)).add_(g)
            return list(grads[len(names):])

        if h_in is not None:
            d_h_in = torch.empty_like(h_in)
        for chunks in groups:  # 2. steps 1 and 4, a group at a time
            g = leaves(chunks, "x", "dt", "A", "B", "C")
            if h_in is not None:
                g["h_in"] = h_in.detach()[:, :, chunks].requires_grad_()
            with torch.enable_grad():
                y = _chunk_outputs(*_chunked(g["x"], g["dt"], A, g["B"], g["C"], Q, scale), g.get("h_in"), bidirectional)
                y = _unchunked(y, g["x"].size(-1))
            extra = collect(chunks, g, y, positions(grad, chunks))
            if h_in is not None:
                d_h_in[:, :, chunks] = extra[0]
        if h_in is not None:  # 3. back through step 3, then step 2 of each group
            # (h_in cloned: the saved one must survive a second backward with retain_graph)
            d_states, d_decay = _pass_states_backward(h_in.clone(), chunk_decay, d_h_in, bidirectional)
            del d_h_in
            for chunks in groups:
                g = leaves(chunks, "x", "dt", "A", "B")
                with torch.enable_grad():
                    a, xdt, Bc, _ = _chunked(g["x"], g["dt"], A, g["B"], None, Q, scale)
                    local = _chunk_states(a, xdt, Bc, bidirectional)
                collect(chunks, g, local, (d_states[:, :, chunks], d_decay[:, :, chunks]))
        return d["x"], d["dt"], d["A"], d["B"], d["C"], dD, None, None, None


# where the chunks are in a (b, h, c, Q), xdt (b, h, c, p, Q), B and C (b, c, n, Q), h_in (b, h, c, p, k, n)
_CHUNK_DIM = (2, 2, 1, 1, 2)


def _chunk_groups(c: int, sequences: int) -> list[slice]:
    """Runs of consecutive chunks covering all c, for ``sequences`` (batch x heads) scanned at once."""
    size = -(-c // max(1, min(c, RECOMPUTE_GROUPS, sequences * c // GROUP_MIN_CHUNKS)))
    return [slice(s, min(s + size, c)) for s in range(0, c, size)]


def _group(inner: tuple[Tensor | None, ...], chunks: slice) -> list[Tensor | None]:
    """(a, xdt, B, C, h_in) of a run of chunks, as views (None stays None)."""
    return [None if t is None else t[(slice(None),) * dim + (chunks,)] for t, dim in zip(inner, _CHUNK_DIM)]


@functools.lru_cache(maxsize=64)
def _lower(Q: int, device: torch.device) -> Tensor:
    return torch.ones(Q, Q, dtype=torch.bool, device=device).tril()


def _prefix_sums(a: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive and exclusive cumulative sums of a (..., Q) along the chunk, in float64.

    Log-decays of segments are differences of these; a huge step before both ends of a segment
    would make the difference cancel catastrophically in float32.
    """
    a = a.double()
    P = torch.cumsum(a, -1)  # a_0 + .. + a_i
    return P, P - a  # and a_0 + .. + a_{i-1}


class DecayMask(torch.autograd.Function):
    """The within-chunk decay mask: a (..., Q) log-decays -> M (..., Q, Q) in a's dtype.

        causal:        M[i, j] = exp(a_{j+1} + .. + a_i) = exp(P_i - P_j) for j <= i, 0 above
        bidirectional: the same below the diagonal and exp(a_i + .. + a_{j-1}) = exp(R_j - R_i) above

    (P, R: inclusive and exclusive prefix sums, :func:`_prefix_sums`). The differences are taken in
    float64, exponents below :func:`decay`'s floor give 0 (causal) or exp(floor) ~ 1e-19 (far below
    rounding error; no subnormals either way). A hand-written backward: autograd through these
    Q x Q float64 differences, the triangle selection and the exponential costs several times more
    passes over the mask than the six below, and the mask is the largest tensor of the scan.
    """

    @staticmethod
    def forward(ctx, a: Tensor, bidirectional: bool) -> Tensor:
        Q = a.size(-1)
        P, R = _prefix_sums(a)
        lower = _lower(Q, a.device)
        log_mask = P[..., :, None] - P[..., None, :]
        if bidirectional:  # lower triangle from P, strict upper from R, with one temporary Q x Q
            log_mask = log_mask.tril_().add_((R[..., None, :] - R[..., :, None]).triu_(1))
            mask = torch.exp(log_mask.to(a.dtype).clamp_min_(_floor(a.dtype)))
        else:
            mask = decay(log_mask.masked_fill_(~lower, -math.inf).to(a.dtype))
        ctx.bidirectional = bidirectional
        ctx.save_for_backward(mask)
        return mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        g = grad * mask  # d/d(log mask)
        # lower triangle: log mask P_i - P_j -> +row sums to P_i, -column sums to P_j
        g_lower = g.tril()
        dP = g_lower.sum(-1) - g_lower.sum(-2)
        dR = None
        if ctx.bidirectional:  # strict upper triangle: R_j - R_i
            dR = (g.sum(-2) - g_lower.sum(-2)) - (g.sum(-1) - g_lower.sum(-1))
            dP = dP + dR
        # P = cumsum(a): da_k = sum_{i >= k} dP_i;  R = P - a: da -= dR
        da = torch.flip(torch.cumsum(torch.flip(dP, (-1,)), -1), (-1,))
        if dR is not None:
            da = da - dR
        return da, None


def _floor(dtype: torch.dtype) -> float:
    return 0.5 * math.log(torch.finfo(dtype).tiny)


def selective_scan_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The same recurrence as ``ssd_chunked_scan``, one time step at a time (the test oracle).

    Shapes as in ``ssd_chunked_scan``; computes in the dtype of x (use float64 for reference values).
    """
    b, l, h, p = x.shape
    n = B.size(-1)
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        inp = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]  # (b, h, p, n)
        state = decay[..., None, None] * state + inp
        ys.append(state @ C[:, t, None, :, None])  # (b, h, p, 1)
    return torch.stack(ys, dim=1).squeeze(-1), state  # (b, l, h, p)


class SelectiveSSM(nn.Module):
    """Mamba-2 style selective SSM over sequences: input-dependent dt, B, C; scalar decay per head.

    Maps x (b, d_inner, l) to y (b, d_inner, l), channel-major like the feature maps it comes from;
    float32 (float64 for float64 input). With a gate z (b, d_inner, l) the output is y * silu(z)
    (the Mamba gated output). Causal: y[..., i] depends on x[..., :i+1] only; ``bidirectional``
    adds the scan of the reversed sequence (one quasiseparable pass, :func:`ssd_scan`). The input
    projection, local mixing and output projection live in the caller (``SerpentineBlock``), which
    runs all its scan orders through one call of this layer.
    """

    def __init__(
        self,
        d_inner: int,
        d_state: int = 32,
        headdim: int = 32,
        chunk_size: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
    ) -> None:
        super().__init__()
        if d_inner % headdim:
            raise ValueError(f"d_inner ({d_inner}) must be a multiple of headdim ({headdim})")
        self.d_state, self.headdim, self.chunk_size = d_state, headdim, chunk_size
        self.nheads = d_inner // headdim
        # One projection gives the per-position dt (one per head), B and C (Mamba-1's x_proj;
        # Mamba-2 folds it into in_proj, equivalent up to where the conv sits).
        self.x_proj = nn.Linear(d_inner, self.nheads + 2 * d_state, bias=False)
        # Initialisation of Mamba / Mamba-2: softplus(dt_bias) log-uniform in [dt_min, dt_max],
        # A uniform in A_init_range, D = 1.
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads))

    def forward(
        self,
        x: Tensor,
        z: Tensor | None = None,
        *,
        bidirectional: bool = False,
        scale: float = 1.0,
        skip: float = 1.0,
        recompute: bool = False,
    ) -> Tensor:
        """y = scale * scan(x) + skip * D x (then the gate): ``scale`` and ``skip`` let a caller that
        sums several scans of one input form their mean without another pass over the outputs.
        ``recompute``: the scan keeps no intermediates for backward and recomputes them there, a
        group of chunks at a time (:func:`ssd_scan`); same values, less memory, more time."""
        b, d_inner, l = x.shape
        # bmm, not matmul: matmul folds (k, d) @ (b, d, l) into one 2-D product over a transposed
        # copy of x, which it then keeps for backward beside x itself.
        proj = torch.bmm(self.x_proj.weight.expand(b, -1, -1), x)
        dt, B, C = proj.split([self.nheads, self.d_state, self.d_state], dim=1)
        dt = F.softplus(dt.to(_scan_dtype(x.dtype)) + self.dt_bias[:, None])  # (b, h, l), never in bf16
        A = -torch.exp(self.A_log.to(dt.dtype))  # (h,) strictly negative, float32 (float64 for float64 input)
        xh = x.view(b, self.nheads, self.headdim, l)  # (b, h, p, l)
        # The scan adds the skip term itself: recomputing, its gradient then starts the one of x in
        # place, where autograd would hold it as one more x-sized tensor until the scan's arrives.
        y, _ = ssd_scan(xh, dt, A, B, C, chunk_size=self.chunk_size, bidirectional=bidirectional, input_scale=scale,
                        D=skip * self.D, recompute=recompute)
        y = y.view(b, d_inner, l)
        if z is not None:
            y = y * F.silu(z.to(y.dtype))
        return y
