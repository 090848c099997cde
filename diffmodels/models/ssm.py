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
    floor = 0.5 * math.log(torch.finfo(s.dtype).tiny)
    return torch.exp(s.masked_fill(s < floor, -math.inf))


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
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan (Mamba-2, sec. 6), linear in the sequence length l.

    x (b, l, h, p), dt (b, l, h) > 0, A (h,) < 0, B and C (b, l, n), initial_state (b, h, p, n).
    Returns y (b, l, h, p) without the D skip term, and the final state (b, h, p, n). Both are
    float32 (float64 for float64 inputs) whatever the input dtype or autocast state.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = _scan_dtype(x.dtype)
    # Autocast would run the matmuls below in bf16/fp16; the decays exp(sum a) need float32.
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
        b, l, h, p = x.shape
        n = B.size(-1)
        Q = min(chunk_size, l)  # a sequence shorter than a chunk is one chunk: no padding work
        pad = (-l) % Q
        if pad:
            # dt = 0 on the padding: decay exp(0) = 1 and input dt*x = 0, so the state passes
            # through unchanged and the padded outputs are simply cut off at the end.
            x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
        c = (l + pad) // Q

        a = (dt * A).view(b, c, Q, h).permute(0, 3, 1, 2)  # (b, h, c, Q) log-decays, <= 0
        xdt = (x * dt[..., None]).view(b, c, Q, h, p).permute(0, 3, 1, 2, 4)  # (b, h, c, Q, p)
        B = B.view(b, 1, c, Q, n)  # shared over heads
        C = C.view(b, 1, c, Q, n)

        # 1. within chunks: y[i] = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + .. + a_i) dt_j x_j
        L = decay(segsum(a))  # (b, h, c, Q, Q)
        CB = C @ B.transpose(-1, -2)  # (b, 1, c, Q, Q)
        y = (CB * L) @ xdt  # (b, h, c, Q, p)

        # 2. each chunk's final state from a zero start: sum_j exp(a_{j+1} + .. + a_{Q-1}) dt_j x_j B_j^T
        # The exclusive reverse cumsum sums each suffix directly (no cancellation).
        a_suffix = torch.flip(torch.cumsum(torch.flip(a[..., 1:], (-1,)), -1), (-1,))
        decay_to_end = decay(F.pad(a_suffix, (0, 1)))  # (b, h, c, Q)
        states = (xdt * decay_to_end[..., None]).transpose(-1, -2) @ B  # (b, h, c, p, n)

        # 3. recurrence over chunks: h_c = exp(a summed over chunk c) h_{c-1} + states_c.
        a_prefix = torch.cumsum(a, dim=-1)  # (b, h, c, Q), inclusive: a_0 + .. + a_i
        chunk_decay = decay(a_prefix[..., -1])  # (b, h, c)
        state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(dtype)
        entering = []
        # unbind once: indexing states[:, :, k] in the loop would make backward O(c^2)
        for decay_k, states_k in zip(chunk_decay.unbind(2), states.unbind(2)):
            entering.append(state)
            state = decay_k[..., None, None] * state + states_k
        h_in = torch.stack(entering, dim=2)  # (b, h, c, p, n) state entering each chunk

        # 4. entering state to outputs: y[i] += exp(a_0 + .. + a_i) C_i . h_in
        y = y + (C @ h_in.transpose(-1, -2)) * decay(a_prefix)[..., None]  # (b, h, c, Q, p)

        y = y.permute(0, 2, 3, 1, 4).reshape(b, c * Q, h, p)[:, :l]  # (b, l, h, p)
    return y, state


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

    Maps x (b, l, d_inner) to y (b, l, d_inner), float32 (float64 for float64 input). With a gate
    z (b, l, d_inner) the output is y * silu(z) (the Mamba gated output). Causal: y[:, i] depends
    on x[:, :i+1] only. The input projection, local mixing and output projection live in the
    caller (``SerpentineBlock``), which runs several scan orders through one call of this layer.
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

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        b, l, d_inner = x.shape
        dt, B, C = self.x_proj(x).split([self.nheads, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt.to(_scan_dtype(x.dtype)) + self.dt_bias)  # (b, l, h), never in bf16
        A = -torch.exp(self.A_log.float())  # (h,) strictly negative
        xh = x.view(b, l, self.nheads, self.headdim)  # (b, l, h, p)
        y, _ = ssd_chunked_scan(xh, dt, A, B, C, self.chunk_size)  # (b, l, h, p)
        y = y + self.D[:, None] * xh.to(y.dtype)
        y = y.reshape(b, l, d_inner)
        if z is not None:
            y = y * F.silu(z.to(y.dtype))
        return y
