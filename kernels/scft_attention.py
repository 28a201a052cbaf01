"""Triton kernels of SCFT attention for any head dimension up to 1024.

    q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv)
    S = scale * q k^T                    (never stored: O(N*M) is what these kernels avoid)
    out = softmax_rows(S) v  (q's dtype),   lse = logsumexp_rows(S)  (float32, (B, H, N))

Backward: Delta = rowsum(dO * O), P = exp(S - lse), dV = P^T dO, dS = P * (dO V^T - Delta),
dQ = scale dS K, dK = scale dS^T Q.

Why these kernels differ from the fused-attention tutorial: the paper's head dimension is
D = Dv = 992. The tutorial keeps a whole (BLOCK_M, D) query tile and a (BLOCK_M, Dv)
accumulator in registers, which stops at D = 256. Here
  * every reduction over D (S = q k^T) or Dv (dP = dO v^T) is a loop over BLOCK_D-wide
    chunks accumulating an fp32 score tile, so its width costs registers only per chunk;
  * every output that is D or Dv wide (out, dK, dV, dQ) is split across programs along a
    grid axis of BLOCK_DV / BLOCK_C-wide slices. Each program recomputes the score tile
    for its own slice: extra QK^T FLOPs bought for bounded registers (the counts are in
    benchmarks/NOTES-triton.md).
All offsets honour arbitrary strides, so transposed views run without copies, and every
load is masked, so no size has to be a power of two.

Launchers (``attention_forward``, ``attention_backward``) allocate outputs and launch;
``launch`` wraps each kernel before it is called (sketchcolor.ops._triton_attention passes
torch.library.wrap_triton so torch.compile can see the kernels).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Callable, Iterator

import torch
import triton
import triton.language as tl

from ._tiles import INTERPRETING, _cast, _dot, _rows_dot_rows, int32_last_axis, last_axis_passes_int32, on_the_inputs_device

MAX_HEAD_DIM = 1024  # D and Dv: larger works numerically, but no config was tuned or proven for it
LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    """Choices of the Triton SCFT-attention kernels.

    tf32: float32 inputs use TF32 tensor-core dots (10-bit mantissa, ~8x faster on
        A100/H100) instead of IEEE fp32 FMA dots. Off by default so fp32 results agree
        with the reference to ~1e-6. No effect on bf16/fp16.
    deterministic: dQ is computed by its own kernel (one program owns each dQ tile)
        instead of fp32 atomic adds from the dK/dV kernel, and every kernel runs the first
        config that fits instead of the one the autotuner times fastest. Bitwise
        reproducible, across processes too on the same GPU model and Triton version, but
        recomputes the score tiles once more (see NOTES-triton.md). Also in effect while
        ``torch.use_deterministic_algorithms(True)`` is.
    """

    tf32: bool = False
    deterministic: bool = False


# Process-wide on purpose, not thread-local or a ContextVar: autograd runs backward on its
# own worker threads, which would not see a setting made in the caller's thread.
_options = Options()
_options_lock = threading.Lock()


def get_options() -> Options:
    """The options the next launch will use."""
    return _options


def set_options(**changes) -> Options:
    """Replace fields of the current options (e.g. ``set_options(tf32=True)``); returns the previous ones.

    Under torch.compile the options are read when the graph is traced: call
    torch._dynamo.reset() after changing them to retrace.
    """
    global _options
    with _options_lock:
        previous = _options
        _options = dataclasses.replace(previous, **changes)
    return previous


@contextlib.contextmanager
def options(**changes) -> Iterator[Options]:
    """``with options(deterministic=True): loss.backward()`` -- restores the old options on exit."""
    previous = set_options(**changes)
    try:
        yield get_options()
    finally:
        set_options(**dataclasses.asdict(previous))


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _scft_attn_fwd(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    H, N, M, D, DV,
    qk_scale,  # scale * log2(e): the softmax runs in base 2 because exp2 is one MUFU instruction
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner iteration
    BLOCK_D: tl.constexpr,  # chunk of the D reduction of S = q k^T
    BLOCK_DV: tl.constexpr,  # slice of Dv this program owns
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (only read for float32 inputs)
):
    # Axis 0 is the Dv slice, the fastest-varying launch index, so the programs that share
    # a query block (and recompute the same scores) run side by side and hit the same q/k
    # lines in L2.
    pid_dv = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_nb = tl.arange(0, BLOCK_N)
    m_valid = offs_m < N
    dv_valid = offs_dv < DV

    # Row bases in int64: N * stride can pass 2^31 for long sequences in strided layouts.
    q_rows = Q + off_b * stride_qb + off_h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qn
    k_head = K + off_b * stride_kb + off_h * stride_kh
    v_head = V + off_b * stride_vb + off_h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base-2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s - m_i)
    # The output slice stays in registers for the whole key loop: it is the one tile every
    # iteration updates. BLOCK_DV bounds it; the other slices belong to other programs.
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + offs_nb
        n_valid = offs_n < M
        k_cols = k_head + offs_n.to(tl.int64)[None, :] * stride_km
        # S tile over the full D, chunk by chunk: q is re-read for every key tile.
        s = _rows_dot_rows(q_rows, m_valid, k_cols, n_valid, D, stride_qd, stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        s = tl.where(n_valid[None, :], s * qk_scale, float("-inf"))

        # Online softmax. Every key tile holds at least one valid key, so m_new is finite
        # and alpha = 2^(-inf) = 0 on the first tile: no NaN even for padded query rows.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_head + offs_n.to(tl.int64)[:, None] * stride_vm + offs_dv[None, :] * stride_vd,
            mask=n_valid[:, None] & dv_valid[None, :],
            other=0.0,
        )
        acc = _dot(_cast(p, v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_on + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, _cast(out, Out.dtype.element_ty), mask=m_valid[:, None] & dv_valid[None, :])
    # Every Dv slice computed the same statistics; slice 0 writes them.
    if pid_dv == 0:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
        tl.store(Lse + off_b * stride_lb + off_h * stride_lh + offs_m.to(tl.int64) * stride_ln, lse, mask=m_valid)


@triton.jit
def _scft_attn_bwd_preprocess(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, DV,  # Delta is a fresh contiguous (B, H, N) float32 tensor
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < N
    o_rows = Out + off_b * stride_ob + off_h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_on
    do_rows = DO + off_b * stride_dob + off_h * stride_doh + offs_m.to(tl.int64)[:, None] * stride_don
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Loop over Dv so any width fits: this kernel is a pure stream over O and dO.
    for start_e in range(0, DV, BLOCK_DV):
        e = start_e + offs_e
        mask = m_valid[:, None] & (e < DV)[None, :]
        o = tl.load(o_rows + e[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_rows + e[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
        delta += tl.sum(o * do, 1)
    tl.store(Delta + pid_bh.to(tl.int64) * N + offs_m, delta, mask=m_valid)


@triton.jit
def _scft_attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV_, DQ_ACC,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_dkb, stride_dkh, stride_dkm, stride_dkd,
    stride_dvb, stride_dvh, stride_dvm, stride_dvd,
    H, N, M, D, DV,  # Delta and DQ_ACC are fresh contiguous float32 tensors ((B,H,N), (B,H,N,D))
    scale,
    qk_scale,  # scale * log2(e)
    BLOCK_M: tl.constexpr,  # queries per inner iteration
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,  # chunk of the D (and Dv) reductions that rebuild S and dP
    BLOCK_C: tl.constexpr,  # slice of D (for dK, dQ) and of Dv (for dV) this program owns; a multiple of BLOCK_D
    ATOMIC_DQ: tl.constexpr,  # also add this key block's share of dQ into DQ_ACC with atomics
    DOT_PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_db = tl.arange(0, BLOCK_D)
    n_valid = offs_n < M
    c_in_d = offs_c < D
    c_in_dv = offs_c < DV

    q_head = Q + off_b * stride_qb + off_h * stride_qh
    do_head = DO + off_b * stride_dob + off_h * stride_doh
    k_rows = K + off_b * stride_kb + off_h * stride_kh + offs_n.to(tl.int64)[:, None] * stride_km
    v_rows = V + off_b * stride_vb + off_h * stride_vh + offs_n.to(tl.int64)[:, None] * stride_vm
    lse_head = Lse + off_b * stride_lb + off_h * stride_lh
    delta_head = Delta + pid_bh.to(tl.int64) * N

    # This program's key block owns dK[:, slice] and dV[:, slice] for all queries, so both
    # accumulate in registers across the whole query loop and are written once.
    dk = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)

    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + offs_mb
        m_valid = offs_m < N
        q_cols = q_head + offs_m.to(tl.int64)[None, :] * stride_qn
        do_cols = do_head + offs_m.to(tl.int64)[None, :] * stride_don
        # Scores and dP are built transposed, (keys, queries), so that dV += P^T dO and
        # dK += dS^T Q are plain dots with no transpose of a register tile. The k and v
        # chunks are re-read for every query tile and q, dO for every key block: no
        # (rows, D) tile fits in registers at D = 992; the slice programs of one key block
        # run side by side (axis 0), so the re-reads are L2 hits.
        s_t = _rows_dot_rows(k_rows, n_valid, q_cols, m_valid, D, stride_kd, stride_qd, BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)
        dp_t = _rows_dot_rows(v_rows, n_valid, do_cols, m_valid, DV, stride_vd, stride_dod, BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)

        lse = tl.load(lse_head + offs_m * stride_ln, mask=m_valid, other=0.0)
        delta = tl.load(delta_head + offs_m, mask=m_valid, other=0.0)
        # Padded entries get P = 0. Query columns: they add nothing to dK, dV (their q, dO are 0
        # already; this keeps exp2 of garbage statistics out of the sums). Key rows: their score
        # is 0, so exp(0 - lse) overflows where lse is very negative, and the 16-bit dS would
        # carry inf into the atomic dQ product, where inf * (k = 0) is NaN in every column.
        p_t = tl.where(n_valid[:, None] & m_valid[None, :], tl.exp2(s_t * qk_scale - lse[None, :] * 1.4426950408889634), 0.0)
        ds_t = p_t * (dp_t - delta[None, :])

        do_slice = tl.load(
            do_head + offs_m.to(tl.int64)[:, None] * stride_don + offs_c[None, :] * stride_dod,
            mask=m_valid[:, None] & c_in_dv[None, :],
            other=0.0,
        )
        dv = _dot(_cast(p_t, do_slice.dtype), do_slice, dv, DOT_PRECISION)
        q_slice = tl.load(
            q_head + offs_m.to(tl.int64)[:, None] * stride_qn + offs_c[None, :] * stride_qd,
            mask=m_valid[:, None] & c_in_d[None, :],
            other=0.0,
        )
        ds_t_lo = _cast(ds_t, q_slice.dtype)
        dk = _dot(ds_t_lo, q_slice, dk, DOT_PRECISION)
        if ATOMIC_DQ:
            # dQ[rows, slice] += scale * dS K[:, slice]: every key block adds into the same
            # dQ tile, so the adds are fp32 atomics on a scratch buffer (their order varies
            # from run to run: Options(deterministic=True) uses _scft_attn_bwd_dq instead).
            # BLOCK_D-wide pieces keep the partial product small next to the dK/dV tiles.
            # A slice past D (when Dv > D it only serves dV) has no dQ to add.
            if pid_c * BLOCK_C < D:
                # Computed transposed, dQ^T[slice, rows] = K[:, slice]^T dS^T, with the k piece
                # read from memory as (slice, keys): dS^T is a product's result, and on sm_90
                # Triton 3.4 to 3.7.0 miscompile a tl.trans of one fed to tl.dot (wrong
                # values, fla-org/flash-linear-attention#640; the GPU machines run 3.6).
                dq_cols = DQ_ACC + (pid_bh.to(tl.int64) * N + offs_m[None, :]) * D
                k_cols_t = K + off_b * stride_kb + off_h * stride_kh + offs_n.to(tl.int64)[None, :] * stride_km
                for c0 in tl.static_range(0, BLOCK_C, BLOCK_D):
                    offs_p = pid_c * BLOCK_C + c0 + offs_db
                    p_valid = offs_p < D
                    k_piece_t = tl.load(k_cols_t + offs_p[:, None] * stride_kd, mask=p_valid[:, None] & n_valid[None, :], other=0.0)
                    dq_piece_t = _dot(k_piece_t, ds_t_lo, tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32), DOT_PRECISION)
                    tl.atomic_add(dq_cols + offs_p[:, None], dq_piece_t * scale, mask=p_valid[:, None] & m_valid[None, :], sem="relaxed")

    dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + offs_n.to(tl.int64)[:, None] * stride_dkm + offs_c[None, :] * stride_dkd
    tl.store(dk_ptrs, _cast(dk * scale, DK.dtype.element_ty), mask=n_valid[:, None] & c_in_d[None, :])
    dv_ptrs = DV_ + off_b * stride_dvb + off_h * stride_dvh + offs_n.to(tl.int64)[:, None] * stride_dvm + offs_c[None, :] * stride_dvd
    tl.store(dv_ptrs, _cast(dv, DV_.dtype.element_ty), mask=n_valid[:, None] & c_in_dv[None, :])


@triton.jit
def _scft_attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N, M, D, DV,  # Delta is a fresh contiguous (B, H, N) float32 tensor
    scale,
    qk_scale,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner iteration
    BLOCK_D: tl.constexpr,  # chunk of the D and Dv reductions
    BLOCK_C: tl.constexpr,  # slice of D this program owns in dQ
    DOT_PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_nb = tl.arange(0, BLOCK_N)
    m_valid = offs_m < N
    c_valid = offs_c < D

    q_rows = Q + off_b * stride_qb + off_h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qn
    do_rows = DO + off_b * stride_dob + off_h * stride_doh + offs_m.to(tl.int64)[:, None] * stride_don
    k_head = K + off_b * stride_kb + off_h * stride_kh
    v_head = V + off_b * stride_vb + off_h * stride_vh
    # Row statistics are fixed for the whole key loop: load once, keep in registers.
    lse = tl.load(Lse + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ln, mask=m_valid, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * N + offs_m, mask=m_valid, other=0.0)
    lse2 = lse * 1.4426950408889634

    # One program owns each dQ tile: no atomics, a fixed summation order over key tiles.
    dq = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + offs_nb
        n_valid = offs_n < M
        k_cols = k_head + offs_n.to(tl.int64)[None, :] * stride_km
        v_cols = v_head + offs_n.to(tl.int64)[None, :] * stride_vm
        s = _rows_dot_rows(q_rows, m_valid, k_cols, n_valid, D, stride_qd, stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        dp = _rows_dot_rows(do_rows, m_valid, v_cols, n_valid, DV, stride_dod, stride_vd, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        p = tl.where(n_valid[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        k_slice = tl.load(
            k_head + offs_n.to(tl.int64)[:, None] * stride_km + offs_c[None, :] * stride_kd,
            mask=n_valid[:, None] & c_valid[None, :],
            other=0.0,
        )
        dq = _dot(_cast(ds, k_slice.dtype), k_slice, dq, DOT_PRECISION)

    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m.to(tl.int64)[:, None] * stride_dqn + offs_c[None, :] * stride_dqd
    tl.store(dq_ptrs, _cast(dq * scale, DQ.dtype.element_ty), mask=m_valid[:, None] & c_valid[None, :])


# --------------------------------------------------------------------------------------
# Configurations, pruning, autotuning
# --------------------------------------------------------------------------------------
# The tile parameters of every kernel are triton.Config kwargs. Each list is what the
# autotuner may try on a GPU; _prune drops the ones whose shared memory does not fit the
# device (tests/test_triton_compile.py compiles every config that survives for each GPU
# generation from sm_80 to sm_120 and checks that smem_estimate bounds what the compiler
# really allocates).
# Register budget (why no tile is larger): an fp32 accumulator of R x C costs
# R*C / (32*num_warps) registers per thread, out of 255. The forward keeps
# BLOCK_M * BLOCK_DV <= 32K (128 registers at 8 warps); the dK/dV kernel holds two
# accumulators, so 2 * BLOCK_N * BLOCK_C <= 32K.
FWD_CONFIGS = [
    # Wide Dv slices: D = Dv = 992 needs 4 (or 2) slices instead of 8, so S is rebuilt fewer times.
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DV": 256}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DV": 512}, num_warps=8, num_stages=2),
    # The same 4 slices in 60 KB: the widest slice that fits the 99 KiB of sm_86/89/120.
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "BLOCK_DV": 256}, num_warps=8, num_stages=2),
    # Narrower slices, bigger score tiles: better when Dv <= 128 (one slice) or where registers are short.
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32, "BLOCK_DV": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DV": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DV": 64}, num_warps=8, num_stages=3),
]
BWD_DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_C": 256}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_C": 128}, num_warps=8, num_stages=2),
    # The same 128-wide slices over 32-wide D chunks: the only atomic dK/dV config that spills on
    # no target from sm_80 to sm_100 (mma.sync keeps operand fragments in registers; the ones
    # above spill on sm_80). sm_120 allocates differently: 16 bytes there (NOTES-triton.md).
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "BLOCK_C": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 32, "BLOCK_C": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "BLOCK_C": 64}, num_warps=4, num_stages=3),
]
BWD_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_C": 256}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_C": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_C": 64}, num_warps=4, num_stages=3),
]
# float32 inputs get their own, smaller tiles: an IEEE fp32 dot runs on FMA units and
# keeps operand strips in registers, so the 16-bit tiles above spill kilobytes per thread.
# TF32 dots run on tensor cores with these tiles too.
FWD_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 16, "BLOCK_DV": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 16, "BLOCK_DV": 64}, num_warps=4, num_stages=2),
]
BWD_DKDV_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": 16, "BLOCK_C": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 16, "BLOCK_C": 64}, num_warps=4, num_stages=2),
]
BWD_DQ_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 32, "BLOCK_C": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 16, "BLOCK_C": 64}, num_warps=4, num_stages=2),
]
# Delta = rowsum(dO * O) is a stream over two (N, Dv) tensors: no reuse to tune for.
BWD_PREPROCESS_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_DV": 128}, num_warps=4, num_stages=1)

# Under TRITON_INTERPRET=1 (numerics tests on the CPU) every kernel runs one small config,
# so nothing is benchmarked and the numpy emulation stays fast. The blocks are still smaller
# than the test shapes, so tails, several D chunks and several slices all run.
INTERPRET_CONFIGS = {
    "fwd": triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 64, "BLOCK_DV": 128}),
    "bwd_dkdv": triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 64, "BLOCK_C": 128}),
    "bwd_dq": triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 64, "BLOCK_C": 128}),
    "bwd_preprocess": triton.Config({"BLOCK_M": 16, "BLOCK_DV": 64}),
}

# kernel -> (configs for 16-bit inputs, configs for float32 inputs)
GPU_CONFIGS = {
    "fwd": (FWD_CONFIGS, FWD_CONFIGS_FP32),
    "bwd_dkdv": (BWD_DKDV_CONFIGS, BWD_DKDV_CONFIGS_FP32),
    "bwd_dq": (BWD_DQ_CONFIGS, BWD_DQ_CONFIGS_FP32),
    "bwd_preprocess": ([BWD_PREPROCESS_CONFIG], [BWD_PREPROCESS_CONFIG]),
}
for _config in BWD_DKDV_CONFIGS + BWD_DKDV_CONFIGS_FP32 + [INTERPRET_CONFIGS["bwd_dkdv"]]:
    # the atomic dQ update walks the slice in BLOCK_D-wide pieces
    assert _config.kwargs["BLOCK_C"] % _config.kwargs["BLOCK_D"] == 0, _config

# The axis each kernel's slice block splits (its size decides how often scores are rebuilt).
_SLICE_BLOCK = {"fwd": "BLOCK_DV", "bwd_dkdv": "BLOCK_C", "bwd_dq": "BLOCK_C"}


def smem_estimate(kernel: str, config: triton.Config, elem_size: int) -> int:
    """An upper bound of the shared memory, in bytes, ``kernel`` allocates with ``config``.

    Each kernel stages two groups of tiles per row (or column) block:
      * the pipelined reduction loop (S = q k^T, and in the backward dP = dO v^T after it):
        one buffer per stage for each of the two operand tiles;
      * the slice update after it: the operands of the slice dot(s), including the P (or dS)
        tile that feeds them.
    Triton's shared-memory allocator places buffers by liveness. In the backward kernels the
    loops' buffers are dead when the slice update runs, so the two groups share memory and the
    bound is the larger one. The forward's V slice and P tile may be live during the loop (on
    sm_90 in TF32 mode they are), so there the groups add up. On top: one fp32 per row and
    warp for the forward's cross-warp row max and sum, and 1 KiB for the async pipelines'
    mbarriers (sm_90 and later) and alignment. tests/test_triton_compile.py checks the bound
    against ``compiled.metadata.shared`` for every config on every GPU generation of
    ``aot.GPU_TARGETS``, in 16-bit, IEEE float32 and TF32.
    """
    kw, stages, e = config.kwargs, config.num_stages, elem_size
    pipeline_reserve = 1024
    if kernel == "bwd_preprocess":
        # Scratch of the cross-warp row sums, and one (BLOCK_M, BLOCK_DV) tile: when O and dO
        # differ in layout (one with a strided feature axis), the compiler converts one tile
        # to the other's layout through shared memory.
        return kw["BLOCK_M"] * config.num_warps * 4 + kw["BLOCK_M"] * kw["BLOCK_DV"] * e + pipeline_reserve
    bm, bn, bd = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_D"]
    reduction_loop = stages * (bm + bn) * bd * e
    p_tile = bm * bn * e
    if kernel == "fwd":  # V slice + P, row max/sum scratch
        return reduction_loop + bn * kw["BLOCK_DV"] * e + p_tile + 4 * bm * config.num_warps + pipeline_reserve
    bc = kw["BLOCK_C"]
    if kernel == "bwd_dkdv":  # dO slice, Q slice, a K piece for the atomic dQ, P^T and dS^T
        slice_update = (2 * bm * bc + bn * bd) * e + 2 * p_tile
    elif kernel == "bwd_dq":  # K slice + dS
        slice_update = bn * bc * e + p_tile
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return max(reduction_loop, slice_update) + pipeline_reserve


def all_configs(kernel: str) -> list[triton.Config]:
    """Every config the autotuner of ``kernel`` holds (both dtype families, deduplicated)."""
    configs = []
    for family in GPU_CONFIGS[kernel]:
        configs += [c for c in family if c not in configs]
    return configs


def configs_for(kernel: str, smem_limit: int, elem_size: int) -> list[triton.Config]:
    """The configs of ``kernel`` the autotuner may pick for ``elem_size``-byte inputs on a
    device with ``smem_limit`` bytes of shared memory per block."""
    family = GPU_CONFIGS[kernel][1 if elem_size == 4 else 0]
    return [c for c in family if smem_estimate(kernel, c, elem_size) <= smem_limit]


@functools.cache
def _device_smem_limit(device_index: int) -> int:
    # What the Triton launcher itself checks a kernel against (the opt-in per-block maximum).
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _pickable_configs(kernel: str, configs: list[triton.Config], args: dict) -> list[triton.Config]:
    """Those of ``configs`` that fit the device's shared memory for the inputs' dtype, without
    slices far wider than the dimension they split, in their list order."""
    q = args["Q"] if "Q" in args else args["Out"]
    device_index = q.device.index if q.device.index is not None else 0  # CUDA tensors always carry one
    limit = _device_smem_limit(device_index)
    allowed = configs_for(kernel, limit, q.element_size())
    fitting = [c for c in configs if c in allowed]
    if not fitting:
        raise RuntimeError(f"scft_attention: no {kernel} configuration fits the device's {limit} bytes of shared memory")
    slice_block = _SLICE_BLOCK.get(kernel)
    if slice_block is None:
        return fitting
    # A slice far wider than the dimension it splits only adds masked work: keep the
    # configs whose slice is at most the padded width (or the narrowest ones if none is).
    split = {"fwd": args["DV"], "bwd_dq": args["D"], "bwd_dkdv": max(args["D"], args["DV"])}[kernel]
    snug = [c for c in fitting if c.kwargs[slice_block] <= max(triton.next_power_of_2(split), 16)]
    if snug:
        return snug
    narrowest = min(c.kwargs[slice_block] for c in fitting)
    return [c for c in fitting if c.kwargs[slice_block] == narrowest]


def _make_prune(kernel: str, *, pinned: bool = False):
    """The autotuner's early prune for ``kernel``; ``pinned`` (and the dK/dV kernel without
    atomic dQ, which only deterministic mode runs) keeps just the first pickable config, so
    the choice is fixed instead of timed."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        pickable = _pickable_configs(kernel, configs, args)
        if pinned or (kernel == "bwd_dkdv" and not args["ATOMIC_DQ"]):
            return pickable[:1]
        return pickable

    return prune


def _autotune(kernel: str, key: list[str], reset_to_zero: list[str] | None = None, *, pinned: bool = False):
    def decorate(fn):
        if INTERPRETING:
            return triton.autotune(configs=[INTERPRET_CONFIGS[kernel]], key=key)(fn)
        return triton.autotune(
            configs=all_configs(kernel),
            key=key,
            prune_configs_by={"early_config_prune": _make_prune(kernel, pinned=pinned)},
            reset_to_zero=reset_to_zero,
        )(fn)

    return decorate


# The autotuned launch handles. The raw @triton.jit kernels above stay importable for the
# AOT compile test (it compiles them with each config in turn). In deterministic mode every
# kernel runs the first config that fits instead of the fastest: the tiles set the order of
# the fp32 sums, and a choice by timing can differ from one process to the next. The dK/dV
# kernel pins itself (ATOMIC_DQ=False, in its key, is deterministic mode), the dQ kernel
# always (only that mode runs it), and the forward has a pinned handle of its own.
scft_attn_fwd = _autotune("fwd", ["N", "M", "D", "DV", "DOT_PRECISION"])(_scft_attn_fwd)
scft_attn_fwd_pinned = _autotune("fwd", ["N", "M", "D", "DV", "DOT_PRECISION"], pinned=True)(_scft_attn_fwd)
scft_attn_bwd_preprocess = _autotune("bwd_preprocess", ["N", "DV"])(_scft_attn_bwd_preprocess)
# The atomic dQ accumulator must start at zero before every benchmarked run.
scft_attn_bwd_dkdv = _autotune("bwd_dkdv", ["N", "M", "D", "DV", "ATOMIC_DQ", "DOT_PRECISION"], reset_to_zero=["DQ_ACC"])(
    _scft_attn_bwd_dkdv
)
scft_attn_bwd_dq = _autotune("bwd_dq", ["N", "M", "D", "DV", "DOT_PRECISION"], pinned=True)(_scft_attn_bwd_dq)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# CUDA caps grid axes 1 and 2 at 65535: axis 1 counts row blocks (at least 16 rows each
# in every config), axis 2 is batch * heads.
_MAX_GRID_YZ = 65535
_MAX_ROWS = _MAX_GRID_YZ * 16


def _identity(kernel):
    return kernel


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, rows, dim), got {getattr(t, 'shape', type(t))}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name}: the Triton kernels support float16, bfloat16 and float32, got {t.dtype} "
                "(impl='reference' and impl='cpp' take float64)"
            )
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} has dtype {t.dtype} on {t.device} but q has {q.dtype} on {q.device}; they must match")
    batch, heads, n, d = q.shape
    if k.shape[:2] != (batch, heads) or v.shape[:2] != (batch, heads):
        raise ValueError(f"q, k, v must share (B, H): got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k: head dim D must equal q's {d}, got {k.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v: number of keys M must equal k's {k.shape[2]}, got {v.shape[2]}")
    if k.shape[2] < 1:
        raise ValueError("k: at least one key is needed (a softmax over no keys is undefined)")
    for name, size in (("q, k: head dim D", d), ("v: head dim Dv", v.shape[3])):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be in [1, {MAX_HEAD_DIM}] for the Triton kernels, got {size}")
    if batch * heads > _MAX_GRID_YZ:
        raise ValueError(f"q: B * H = {batch * heads} exceeds the {_MAX_GRID_YZ} programs of a CUDA grid axis")
    if max(n, k.shape[2]) > _MAX_ROWS:
        raise ValueError(f"q, k: N and M must be at most {_MAX_ROWS} rows, got N={n}, M={k.shape[2]}")


def _check_output(name: str, t: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if t is not None and (tuple(t.shape) != shape or t.dtype != dtype or t.device != device):
        raise ValueError(f"{name} must be {shape} {dtype} on {device}, got {tuple(t.shape)} {t.dtype} on {t.device}")


def _check_output_strides(name: str, t: torch.Tensor | None) -> None:
    """A caller's output buffer cannot be swapped for a copy as inputs are (int32_last_axis)."""
    if t is not None and last_axis_passes_int32(t):
        raise ValueError(f"{name}: its last axis's stride {t.stride(-1)} puts offsets past the kernels' int32 range; "
                         "pass a buffer with a smaller one (a contiguous one, say)")


def _deterministic(opts: Options) -> bool:
    # PyTorch's switch binds here too.
    return opts.deterministic or torch.are_deterministic_algorithms_enabled()


def _dot_precision(dtype: torch.dtype, opts: Options) -> str:
    return "tf32" if dtype == torch.float32 and opts.tf32 else "ieee"


@on_the_inputs_device
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    launch: Callable = _identity,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, N, Dv) in q's dtype and lse (B, H, N) float32. Inputs of any strides.

    ``out`` and ``lse`` may be given (any strides, e.g. views into a larger buffer); they
    are written, not read.
    """
    _check_qkv(q, k, v)
    q, k, v = (int32_last_axis(t) for t in (q, k, v))
    batch, heads, n, d = q.shape
    m, dv = k.shape[2], v.shape[3]
    _check_output("out", out, (batch, heads, n, dv), q.dtype, q.device)
    _check_output("lse", lse, (batch, heads, n), torch.float32, q.device)
    _check_output_strides("out", out)
    _check_output_strides("lse", lse)
    if out is None:
        out = torch.empty((batch, heads, n, dv), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    if n == 0 or batch * heads == 0:
        return out, lse

    def grid(meta):
        return (triton.cdiv(dv, meta["BLOCK_DV"]), triton.cdiv(n, meta["BLOCK_M"]), batch * heads)

    opts = get_options()
    launch(scft_attn_fwd_pinned if _deterministic(opts) else scft_attn_fwd)[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        heads, n, m, d, dv,
        float(scale) * LOG2E,
        DOT_PRECISION=_dot_precision(q.dtype, opts),
    )
    return out, lse


@on_the_inputs_device
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    *,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    launch: Callable = _identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v) shaped and typed like (q, k, v). Inputs of any strides.

    ``grads`` may give the three output tensors (any strides); they are written, not read.
    """
    _check_qkv(q, k, v)
    batch, heads, n, d = q.shape
    m, dv = k.shape[2], v.shape[3]
    _check_output("grad_out", grad_out, (batch, heads, n, dv), q.dtype, q.device)
    _check_output("out", out, (batch, heads, n, dv), q.dtype, q.device)
    _check_output("lse", lse, (batch, heads, n), torch.float32, q.device)
    q, k, v, grad_out, out, lse = (int32_last_axis(t) for t in (q, k, v, grad_out, out, lse))
    caller_grads = grads is not None
    if grads is None:
        grads = tuple(torch.empty(t.shape, dtype=q.dtype, device=q.device) for t in (q, k, v))
    for name, g, t in zip(("grad_q", "grad_k", "grad_v"), grads, (q, k, v)):
        _check_output(name, g, tuple(t.shape), q.dtype, q.device)
        _check_output_strides(name, g)
    grad_q, grad_k, grad_v = grads
    if batch * heads == 0:
        return grad_q, grad_k, grad_v
    if n == 0:  # no query: nothing flows back to the keys and values
        return grad_q, grad_k.zero_(), grad_v.zero_()
    opts = get_options()
    precision = _dot_precision(q.dtype, opts)

    # Delta = rowsum(dO * O), fp32, contiguous (B, H, N) as the kernels index it.
    delta = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    launch(scft_attn_bwd_preprocess)[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n, dv,
    )

    # The atomic adds make dQ vary in its last bits from run to run.
    atomic_dq = not _deterministic(opts)
    # The fp32 scratch the dK/dV kernel adds dQ into, contiguous (B, H, N, D) as it indexes
    # it; in deterministic mode a placeholder the kernel never touches.
    dq_acc = torch.zeros((batch, heads, n, d) if atomic_dq else (1,), dtype=torch.float32, device=q.device)

    def grid_dkdv(meta):
        return (triton.cdiv(max(d, dv), meta["BLOCK_C"]), triton.cdiv(m, meta["BLOCK_N"]), batch * heads)

    launch(scft_attn_bwd_dkdv)[grid_dkdv](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, dq_acc,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(),
        *grad_k.stride(), *grad_v.stride(),
        heads, n, m, d, dv,
        float(scale), float(scale) * LOG2E,
        ATOMIC_DQ=atomic_dq, DOT_PRECISION=precision,
    )
    if atomic_dq:
        if caller_grads:
            grad_q.copy_(dq_acc)
            return grad_q, grad_k, grad_v
        return dq_acc.to(q.dtype), grad_k, grad_v  # for float32 the scratch itself, no copy

    def grid_dq(meta):
        return (triton.cdiv(d, meta["BLOCK_C"]), triton.cdiv(n, meta["BLOCK_M"]), batch * heads)

    launch(scft_attn_bwd_dq)[grid_dq](
        q, k, v, grad_out, lse, delta, grad_q,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(), *grad_q.stride(),
        heads, n, m, d, dv,
        float(scale), float(scale) * LOG2E,
        DOT_PRECISION=precision,
    )
    return grad_q, grad_k, grad_v
