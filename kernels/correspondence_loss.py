"""Triton kernels of the correspondence loss for any head dimension up to 1024.

    q (B, N, D), k (B, M, D), pos (B, N) int64 (-1: no correspondence)
    S = scale * q k^T                   (never stored: O(N*M) is what these kernels avoid)
    triplet  terms (B, N, T) = max(0, S[i, neg_it] - S[i, pos_i] + margin), neg (B, N, T)
    hardest  terms (B, N) with neg_i = the lowest-index argmax of S[i, j] over the keys more than
             `exclusion` cells (Chebyshev, on a (h, w) key grid) from pos_i; neg (B, N), -1 for none
    nll      terms (B, N) = lse_i - S[i, pos_i],  lse (B, N) = logsumexp_j S[i, j]
A term that is not valid (pos or neg -1, no candidate) is 0. Terms and lse are float32.

Backward (gradients of the terms with per-term weights g):
  * triplet and hardest need only gathers: with c_it = scale * g_it on positive terms,
    dq_i = sum_t c_it (k[neg_it] - k[pos_i]), and dk is a scatter of the c q_i into the
    pos and neg rows. The scatter is a segmented sum over the contributions sorted by key
    (a stable sort): no atomics, so dk is bitwise reproducible like every other output here.
  * nll: dS = w (P - onehot(pos)) with P = exp(S - lse), w = g where pos >= 0; dq = scale dS K
    and dk = scale dS^T Q by two kernels that each own their output tile (one streams key
    tiles, one streams query tiles) and rebuild the score tiles from q, k and the saved lse.
    The op (``nll_loss``) returns the mean and runs them right away with w = 1 / (number of
    valid rows), as the CPU backend does, so its backward only scales the result.
As in sketchcolor.kernels.scft_attention, every reduction over D is a loop over BLOCK_D chunks
into an fp32 tile and every D-wide output is split across programs in BLOCK_C slices, so
D = 992 costs registers only per chunk; all loads are masked and honour strides.

Launchers (``triplet_forward``, ``triplet_backward``, ``hardest_forward``, and ``nll_loss`` with
its ``nll_forward`` and ``nll_backward``) allocate outputs and launch; ``launch`` wraps each
kernel before the call (sketchcolor.ops._triton_correspondence passes torch.library.wrap_triton).
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from sketchcolor.ops._checks import check_index_values, check_number

from ._tiles import INTERPRETING, _cast, _dot, _rows_dot_rows, int32_last_axis, on_the_inputs_device
from .scft_attention import MAX_HEAD_DIM, _deterministic, _dot_precision, get_options

# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


@triton.jit
def _gathered_dot(q_rows, k_rows, valid, D, stride_qd, stride_kd, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_R,) fp32 row-wise dot products q_r . k_r; q_rows and k_rows are (BLOCK_R, 1) row pointers."""
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    offs_db = tl.arange(0, BLOCK_D)
    for start_d in range(0, D, BLOCK_D):
        offs_d = start_d + offs_db
        mask = valid[:, None] & (offs_d < D)[None, :]
        a = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(k_rows + offs_d[None, :] * stride_kd, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, 1)
    return acc


@triton.jit
def _hinge(x):
    """max(x, 0) that keeps a NaN x, so a NaN score reaches the loss as through the reference's
    relu (tl.maximum's NaN handling is left to the backend)."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _ranks_above(a, b):
    """Whether score a ranks above b in the hardest-negative search: larger, or NaN where b is not
    (torch.argmax, the reference's, ranks NaN above every number)."""
    return (a > b) | ((a != a) & (b == b))


@triton.jit
def _query_block(Pos, off_b, start, N, BLOCK: tl.constexpr):
    """The queries start .. start + BLOCK - 1 of batch off_b: their offsets (BLOCK,), which of
    them exist, their index row = b * N + i into the contiguous (B, N) tensors, and their pos
    (-1 for the ones past N)."""
    offs = start + tl.arange(0, BLOCK)
    valid = offs < N
    row = off_b * N + offs
    pos = tl.load(Pos + row, mask=valid, other=-1)
    return offs, valid, row, pos


# --------------------------------------------------------------------------------------
# Sampled triplet: gathers only
# --------------------------------------------------------------------------------------


@triton.jit
def _corr_triplet_fwd(
    Q, K, Pos, Neg, Terms,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_km, stride_kd,
    N, D, T,  # Pos (B, N), Neg and Terms (B, N, T) are contiguous
    scale, margin,
    BLOCK_R: tl.constexpr,  # query rows per program
    BLOCK_D: tl.constexpr,  # chunk of the D reduction
):
    pid_r = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    offs_r, r_valid, row, pos = _query_block(Pos, off_b, pid_r * BLOCK_R, N, BLOCK_R)
    has_pos = r_valid & (pos >= 0)
    q_rows = Q + off_b * stride_qb + offs_r.to(tl.int64)[:, None] * stride_qn
    k_batch = K + off_b * stride_kb
    pos_score = scale * _gathered_dot(q_rows, k_batch + pos[:, None] * stride_km, has_pos, D, stride_qd, stride_kd,
                                      BLOCK_R, BLOCK_D)
    for t in range(0, T):
        neg = tl.load(Neg + row * T + t, mask=r_valid, other=-1)
        valid = has_pos & (neg >= 0)
        neg_score = scale * _gathered_dot(q_rows, k_batch + neg[:, None] * stride_km, valid, D, stride_qd, stride_kd,
                                          BLOCK_R, BLOCK_D)
        term = tl.where(valid, _hinge(neg_score - pos_score + margin), 0.0)
        tl.store(Terms + row * T + t, term, mask=r_valid)


@triton.jit
def _corr_triplet_bwd_dq(
    K, Pos, Neg, Coef, DQ,
    stride_kb, stride_km, stride_kd,
    N, D, T,  # Pos (B, N), Neg and Coef (B, N, T) float32 and DQ (B, N, D) are contiguous
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dq_i = sum_t c_it k[neg_it] - (sum_t c_it) k[pos_i], one program per block of rows."""
    pid_r = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    offs_r, r_valid, row, pos = _query_block(Pos, off_b, pid_r * BLOCK_R, N, BLOCK_R)
    k_batch = K + off_b * stride_kb
    offs_db = tl.arange(0, BLOCK_D)
    for start_d in range(0, D, BLOCK_D):
        offs_d = start_d + offs_db
        d_valid = offs_d < D
        dq = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        coef_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        for t in range(0, T):
            coef = tl.load(Coef + row * T + t, mask=r_valid, other=0.0)
            neg = tl.load(Neg + row * T + t, mask=r_valid, other=-1)
            k_neg = tl.load(k_batch + neg[:, None] * stride_km + offs_d[None, :] * stride_kd,
                            mask=(coef != 0)[:, None] & d_valid[None, :], other=0.0)
            dq += coef[:, None] * k_neg.to(tl.float32)
            coef_sum += coef
        k_pos = tl.load(k_batch + pos[:, None] * stride_km + offs_d[None, :] * stride_kd,
                        mask=(coef_sum != 0)[:, None] & d_valid[None, :], other=0.0)
        dq -= coef_sum[:, None] * k_pos.to(tl.float32)
        tl.store(DQ + row.to(tl.int64)[:, None] * D + offs_d[None, :], _cast(dq, DQ.dtype.element_ty),
                 mask=r_valid[:, None] & d_valid[None, :])


@triton.jit
def _corr_segment_sum(
    Q, Offsets, Rows, Coefs, Out,
    stride_qb, stride_qn, stride_qd,
    N, D,  # Offsets (R + 1,); Rows (flat b * N + i) and Coefs sorted by output row; Out (R, D) contiguous
    BLOCK_E: tl.constexpr,  # contributions per step
    BLOCK_D: tl.constexpr,  # slice of D this program owns
):
    """Out[r] = sum over e in [Offsets[r], Offsets[r+1]) of Coefs[e] * q[Rows[e]], in sorted order."""
    out_row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    begin = tl.load(Offsets + out_row)
    end = tl.load(Offsets + out_row + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    offs_eb = tl.arange(0, BLOCK_E)
    for start_e in range(begin, end, BLOCK_E):
        offs_e = start_e + offs_eb
        e_valid = offs_e < end
        rows = tl.load(Rows + offs_e, mask=e_valid, other=0)
        coefs = tl.load(Coefs + offs_e, mask=e_valid, other=0.0)
        q_rows = Q + (rows // N)[:, None] * stride_qb + (rows % N)[:, None] * stride_qn
        q = tl.load(q_rows + offs_d[None, :] * stride_qd,
                    mask=e_valid[:, None] & d_valid[None, :], other=0.0)
        acc += tl.sum(coefs[:, None] * q.to(tl.float32), 0)
    tl.store(Out + out_row * D + offs_d, _cast(acc, Out.dtype.element_ty), mask=d_valid)


# --------------------------------------------------------------------------------------
# Hardest negative and nll: streams of score tiles
# --------------------------------------------------------------------------------------


@triton.jit
def _corr_hardest_fwd(
    Q, K, Pos, Terms, NegOut,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_km, stride_kd,
    N, M, D,  # Pos, Terms and NegOut (B, N) are contiguous
    grid_w, exclusion,
    scale, margin,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner iteration
    BLOCK_D: tl.constexpr,  # chunk of the D reduction
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    offs_m, m_valid, row, pos = _query_block(Pos, off_b, pid_m * BLOCK_M, N, BLOCK_M)
    has_pos = pos >= 0
    pos_cell_row = pos // grid_w
    pos_cell_col = pos % grid_w
    q_rows = Q + off_b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_qn
    k_batch = K + off_b * stride_kb

    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_key = tl.full([BLOCK_M], -1, dtype=tl.int64)
    pos_score = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + offs_nb
        n_valid = offs_n < M
        s = scale * _rows_dot_rows(q_rows, m_valid, k_batch + offs_n.to(tl.int64)[None, :] * stride_km, n_valid,
                                   D, stride_qd, stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        is_pos = offs_n[None, :] == pos[:, None]
        pos_score += tl.sum(tl.where(is_pos, s, 0.0), 1)
        outside = (tl.abs(offs_n[None, :] // grid_w - pos_cell_row[:, None]) > exclusion) | (
            tl.abs(offs_n[None, :] % grid_w - pos_cell_col[:, None]) > exclusion)
        candidate = outside & n_valid[None, :] & has_pos[:, None]
        # A NaN candidate ranks above every number: the tile's first one is its best. The others
        # go through tl.max with NaN masked out, whose own NaN handling is then never asked.
        is_nan = candidate & (s != s)
        nan_key = tl.min(tl.where(is_nan, offs_n[None, :], M), 1)
        masked = tl.where(candidate & ~is_nan, s, float("-inf"))
        tile_best = tl.max(masked, 1)
        # The lowest key index reaching the tile's maximum; key tiles run in increasing order and
        # a later tile replaces the best only when it ranks strictly above, so ties keep the
        # lowest index.
        tile_key = tl.min(tl.where(candidate & ~is_nan & (masked == tile_best[:, None]), offs_n[None, :], M), 1)
        tile_best = tl.where(nan_key < M, float("nan"), tile_best)
        tile_key = tl.where(nan_key < M, nan_key, tile_key)
        improves = (tile_key < M) & ((best_key < 0) | _ranks_above(tile_best, best))
        best = tl.where(improves, tile_best, best)
        best_key = tl.where(improves, tile_key.to(tl.int64), best_key)

    term = tl.where(best_key >= 0, _hinge(best - pos_score + margin), 0.0)
    tl.store(Terms + row, term, mask=m_valid)
    tl.store(NegOut + row, best_key, mask=m_valid)


@triton.jit
def _corr_nll_fwd(
    Q, K, Pos, Terms, Lse,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_km, stride_kd,
    N, M, D,  # Pos, Terms and Lse (B, N) are contiguous
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    offs_m, m_valid, row, pos = _query_block(Pos, off_b, pid_m * BLOCK_M, N, BLOCK_M)
    q_rows = Q + off_b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_qn
    k_batch = K + off_b * stride_kb

    # Online logsumexp in base 2 (exp2 is one instruction), as in the attention forward.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_score = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + offs_nb
        n_valid = offs_n < M
        s = scale * _rows_dot_rows(q_rows, m_valid, k_batch + offs_n.to(tl.int64)[None, :] * stride_km, n_valid,
                                   D, stride_qd, stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        pos_score += tl.sum(tl.where(offs_n[None, :] == pos[:, None], s, 0.0), 1)
        # Every key tile holds a valid key: m_new is finite and the first alpha is 2^-inf = 0.
        s2 = tl.where(n_valid[None, :], s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), 1)
        m_i = m_new

    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(Lse + row, lse, mask=m_valid)
    tl.store(Terms + row, tl.where(pos >= 0, lse - pos_score, 0.0), mask=m_valid)


@triton.jit
def _corr_nll_bwd_dq(
    Q, K, Pos, Weight, Lse, DQ,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_km, stride_kd,
    N, M, D,  # Pos, Weight (float32, 0 where pos = -1) and Lse (B, N), DQ (B, N, D) are contiguous
    scale,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner iteration
    BLOCK_D: tl.constexpr,  # chunk of the D reduction that rebuilds S
    BLOCK_C: tl.constexpr,  # slice of D this program owns in dq
    DOT_PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m, m_valid, row, pos = _query_block(Pos, off_b, pid_m * BLOCK_M, N, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = offs_c < D
    weight = tl.load(Weight + row, mask=m_valid, other=0.0)
    lse2 = tl.load(Lse + row, mask=m_valid, other=0.0) * 1.4426950408889634
    q_rows = Q + off_b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_qn
    k_batch = K + off_b * stride_kb

    # One program owns each dq tile: a fixed summation order over the key tiles.
    dq = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + offs_nb
        n_valid = offs_n < M
        s = _rows_dot_rows(q_rows, m_valid, k_batch + offs_n.to(tl.int64)[None, :] * stride_km, n_valid,
                           D, stride_qd, stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        p = tl.where(n_valid[None, :], tl.exp2(s * (scale * 1.4426950408889634) - lse2[:, None]), 0.0)
        ds = weight[:, None] * (p - tl.where(offs_n[None, :] == pos[:, None], 1.0, 0.0))
        k_slice = tl.load(k_batch + offs_n.to(tl.int64)[:, None] * stride_km + offs_c[None, :] * stride_kd,
                          mask=n_valid[:, None] & c_valid[None, :], other=0.0)
        dq = _dot(_cast(ds, k_slice.dtype), k_slice, dq, DOT_PRECISION)
    tl.store(DQ + row.to(tl.int64)[:, None] * D + offs_c[None, :], _cast(dq * scale, DQ.dtype.element_ty),
             mask=m_valid[:, None] & c_valid[None, :])


@triton.jit
def _corr_nll_bwd_dk(
    Q, K, Pos, Weight, Lse, DK,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_km, stride_kd,
    N, M, D,  # Pos, Weight and Lse (B, N), DK (B, M, D) are contiguous
    scale,
    BLOCK_M: tl.constexpr,  # queries per inner iteration
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,  # slice of D this program owns in dk
    DOT_PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n_valid = offs_n < M
    c_valid = offs_c < D
    k_rows = K + off_b * stride_kb + offs_n.to(tl.int64)[:, None] * stride_km
    q_batch = Q + off_b * stride_qb

    # This program's key block owns dk[:, slice] for all queries. Scores are built transposed,
    # (keys, queries), so that dk += dS^T q is a plain dot.
    dk = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m, m_valid, row, pos = _query_block(Pos, off_b, start_m, N, BLOCK_M)
        weight = tl.load(Weight + row, mask=m_valid, other=0.0)
        lse2 = tl.load(Lse + row, mask=m_valid, other=0.0) * 1.4426950408889634
        s_t = _rows_dot_rows(k_rows, n_valid, q_batch + offs_m.to(tl.int64)[None, :] * stride_qn, m_valid,
                             D, stride_kd, stride_qd, BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)
        p_t = tl.where(m_valid[None, :], tl.exp2(s_t * (scale * 1.4426950408889634) - lse2[None, :]), 0.0)
        ds_t = weight[None, :] * (p_t - tl.where(offs_n[:, None] == pos[None, :], 1.0, 0.0))
        q_slice = tl.load(q_batch + offs_m.to(tl.int64)[:, None] * stride_qn + offs_c[None, :] * stride_qd,
                          mask=m_valid[:, None] & c_valid[None, :], other=0.0)
        dk = _dot(_cast(ds_t, q_slice.dtype), q_slice, dk, DOT_PRECISION)
    tl.store(DK + (off_b * M + offs_n.to(tl.int64))[:, None] * D + offs_c[None, :], _cast(dk * scale, DK.dtype.element_ty),
             mask=n_valid[:, None] & c_valid[None, :])


# --------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------
# GPU configs: score tiles of 64 x 64 over 64-wide D chunks (two stages of q and k chunks:
# 16-64 KB of shared memory in 16-bit, within the 99 KiB per block of consumer GPUs), and dq/dk
# slices of 128 or 256 columns (fp32 accumulators of 64 x 256 = 64 registers per thread at 8
# warps). float32 inputs get their own, smaller tiles: IEEE fp32 dots run on FMA units with
# operand strips in registers, and the 16-bit tiles spilled up to 1.7 KB per thread on sm_80
# (the nll backward) and 0.7 KB on sm_90; these spill at most 40 bytes (NOTES-triton.md).
# Under TRITON_INTERPRET=1 each kernel runs one small config, smaller than the test shapes so
# that tails, several D chunks and several slices run.
STREAM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
]
SLICE_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_C": 256}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_C": 128}, num_warps=4, num_stages=2),
]
STREAM_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 16}, num_warps=4, num_stages=2),
]
SLICE_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 16, "BLOCK_C": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 16, "BLOCK_C": 64}, num_warps=4, num_stages=2),
]
GATHER_CONFIGS = [triton.Config({"BLOCK_R": 32, "BLOCK_D": 128}, num_warps=4)]
SEGMENT_CONFIGS = [triton.Config({"BLOCK_E": 16, "BLOCK_D": 256}, num_warps=4)]
INTERPRET_CONFIGS = {
    "stream": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_D": 64}),
    "slice": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_D": 128, "BLOCK_C": 256}),
    "gather": triton.Config({"BLOCK_R": 16, "BLOCK_D": 128}),
    "segment": triton.Config({"BLOCK_E": 4, "BLOCK_D": 256}),
}
# kind -> (configs for 16-bit inputs, configs for float32 inputs); every config fits every
# target's shared memory (tests/test_triton_correspondence.py compiles them all).
GPU_CONFIGS = {
    "stream": (STREAM_CONFIGS, STREAM_CONFIGS_FP32),
    "slice": (SLICE_CONFIGS, SLICE_CONFIGS_FP32),
    "gather": (GATHER_CONFIGS, GATHER_CONFIGS),
    "segment": (SEGMENT_CONFIGS, SEGMENT_CONFIGS),
}


def configs_for(kind: str, elem_size: int) -> list[triton.Config]:
    """The configs a ``kind`` kernel may run with for ``elem_size``-byte inputs."""
    return GPU_CONFIGS[kind][1 if elem_size == 4 else 0]


def _make_prune(kind: str, pinned: bool):
    """The autotuner's prune: the configs of the inputs' dtype; ``pinned``: only the first."""

    def prune(configs, named_args, **kwargs):
        family = configs_for(kind, {**named_args, **kwargs}["Q"].element_size())
        return [c for c in configs if c in family][: 1 if pinned else None]

    return prune


def _autotune(kind: str, key: list[str], *, pinned: bool = False):
    if INTERPRETING:
        return triton.autotune(configs=[INTERPRET_CONFIGS[kind]], key=key)
    sixteen_bit, fp32 = GPU_CONFIGS[kind]
    configs = sixteen_bit + [c for c in fp32 if c not in sixteen_bit]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _make_prune(kind, pinned)})


# The kernels that multiply score tiles take "stream" or "slice" configs by dtype, keyed on the
# problem's size. Deterministic mode (as for attention) runs each one's pinned twin, fixed configs
# rather than the fastest by timing: the tiles set the order of the fp32 sums (the nll's lse, the
# scores' D chunks), and a timed choice can differ from one process to the next. The gather and
# segment kernels hold one config.
_SCORE_TILE_KEY = ["N", "M", "D", "DOT_PRECISION"]
SCORE_TILE_KINDS: dict[triton.runtime.Autotuner, str] = {}  # timed handle -> its configs' kind
PINNED: dict[triton.runtime.Autotuner, triton.runtime.Autotuner] = {}  # timed handle -> pinned twin


def _score_tile_kernel(kind: str, fn) -> triton.runtime.Autotuner:
    """``fn``'s timed handle, entered in SCORE_TILE_KINDS and PINNED."""
    timed = _autotune(kind, _SCORE_TILE_KEY)(fn)
    SCORE_TILE_KINDS[timed] = kind
    PINNED[timed] = _autotune(kind, _SCORE_TILE_KEY, pinned=True)(fn)
    return timed


corr_triplet_fwd = _autotune("gather", ["D", "T"])(_corr_triplet_fwd)
corr_triplet_bwd_dq = _autotune("gather", ["D", "T"])(_corr_triplet_bwd_dq)
corr_segment_sum = _autotune("segment", ["D"])(_corr_segment_sum)
corr_hardest_fwd = _score_tile_kernel("stream", _corr_hardest_fwd)
corr_nll_fwd = _score_tile_kernel("stream", _corr_nll_fwd)
corr_nll_bwd_dq = _score_tile_kernel("slice", _corr_nll_bwd_dq)
corr_nll_bwd_dk = _score_tile_kernel("slice", _corr_nll_bwd_dk)


def _tuned(autotuned):
    """``autotuned``, or in deterministic mode its pinned twin."""
    return PINNED[autotuned] if _deterministic(get_options()) else autotuned


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# CUDA caps grid axes 1 and 2 at 65535: the batch (B * H) runs on one of them, and the nll
# backward's query and key blocks (at least 16 rows each in every config) on the other.
_MAX_GRID_YZ = 65535
_MAX_ROWS = _MAX_GRID_YZ * 16


def _identity(kernel):
    return kernel


def _checked_inputs(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k checked, each copied where its head-dim offsets would pass int32 (int32_last_axis)."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor (B, rows, D), got {getattr(t, 'shape', type(t))}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name}: the Triton kernels support float16, bfloat16 and float32, got {t.dtype} "
                "(use impl='reference' or impl='cpp' for float64)"
            )
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k has dtype {k.dtype} on {k.device}, q has {q.dtype} on {q.device}; they must match")
    batch, n, d = q.shape
    if k.shape[0] != batch or k.shape[2] != d:
        raise ValueError(f"k must be (B, M, D) = ({batch}, M, {d}), got {tuple(k.shape)}")
    if k.shape[1] < 1:
        raise ValueError("k: at least one key is needed")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}] for the Triton kernels, got {d}")
    if pos.dtype != torch.int64 or tuple(pos.shape) != (batch, n) or pos.device != q.device:
        raise ValueError(f"pos must be ({batch}, {n}) int64 on {q.device}, got {tuple(pos.shape)} {pos.dtype} on {pos.device}")
    if batch > _MAX_GRID_YZ:
        raise ValueError(f"B * H = {batch} exceeds the {_MAX_GRID_YZ} programs a CUDA grid axis holds")
    if max(n, k.shape[1]) > _MAX_ROWS:
        raise ValueError(f"q, k: N and M must be at most {_MAX_ROWS} rows for the Triton kernels, got N={n}, M={k.shape[1]}")
    # The ops can be called directly (torch.ops.sketchcolor.corr_*_triton), past the public op's
    # checks: an index outside [-1, M) would make the kernels read outside k.
    check_index_values("pos", pos, k.shape[1])
    return int32_last_axis(q), int32_last_axis(k)


def _check_neg(neg: torch.Tensor, q: torch.Tensor, num_keys: int) -> None:
    batch, n, _ = q.shape
    if neg.dtype != torch.int64 or neg.dim() != 3 or tuple(neg.shape[:2]) != (batch, n) or neg.device != q.device:
        raise ValueError(f"neg must be ({batch}, {n}, T) int64 on {q.device}, got {tuple(neg.shape)} {neg.dtype} on {neg.device}")
    check_index_values("neg", neg, num_keys)


def _check_stat(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != shape or t.dtype != torch.float32:
        raise ValueError(f"{name} must be {shape} float32, got {tuple(t.shape)} {t.dtype}")


@on_the_inputs_device
def triplet_forward(q, k, pos, neg, scale: float, margin: float, *, launch: Callable = _identity) -> torch.Tensor:
    """terms (B, N, T) float32."""
    q, k = _checked_inputs(q, k, pos)
    _check_neg(neg, q, k.shape[1])
    scale, margin = check_number("scale", scale), check_number("margin", margin)
    batch, n, d = q.shape
    negatives = neg.shape[2]
    terms = torch.empty((batch, n, negatives), dtype=torch.float32, device=q.device)
    if terms.numel() == 0:
        return terms
    launch(corr_triplet_fwd)[lambda meta: (triton.cdiv(n, meta["BLOCK_R"]), batch)](
        q, k, pos.contiguous(), neg.contiguous(), terms,
        *q.stride(), *k.stride(),
        n, d, negatives,
        float(scale), float(margin),
    )
    return terms


@on_the_inputs_device
def triplet_backward(grad_terms, q, k, pos, neg, terms, scale: float, *, launch: Callable = _identity):
    """(grad_q, grad_k) like (q, k), contiguous.

    c_it = scale * grad_it on positive terms (0 elsewhere); dq by a gather kernel; dk as a
    segmented sum over the contributions (c_it q_i into row neg_it, -sum_t c_it q_i into row
    pos_i) sorted stably by key, in the order (b, i, pos first, then t).
    """
    q, k = _checked_inputs(q, k, pos)
    _check_neg(neg, q, k.shape[1])
    scale = check_number("scale", scale)
    batch, n, d = q.shape
    m = k.shape[1]
    negatives = neg.shape[2]
    if batch * m > 2**31 - 1:  # the segment sum's grid has a program per key (grid x: 2^31 - 1 at most)
        raise ValueError(f"triplet backward: B * M = {batch * m} keys exceed the kernels' 2^31 - 1 key segments; split the batch")
    for name, t in (("grad_terms", grad_terms), ("terms", terms)):
        _check_stat(name, t, (batch, n, negatives))
    active = (terms > 0) & (pos >= 0).unsqueeze(-1) & (neg >= 0)
    coef = torch.where(active, grad_terms * scale, 0.0)  # (B, N, T) float32
    pos = pos.contiguous()
    neg = neg.contiguous()
    grad_q = torch.empty((batch, n, d), dtype=q.dtype, device=q.device)
    grad_k = torch.empty((batch, m, d), dtype=q.dtype, device=q.device)
    if q.numel() == 0:  # no query: every gradient is zero
        return grad_q, grad_k.zero_()
    launch(corr_triplet_bwd_dq)[lambda meta: (triton.cdiv(n, meta["BLOCK_R"]), batch)](
        k, pos, neg, coef, grad_q,
        *k.stride(),
        n, d, negatives,
    )

    # Contributions (B, N, 1 + T): the pos entry first, then the negatives. Inactive ones get
    # the key B * M, past every real key, so they sort last and no segment holds them.
    batch_offsets = (torch.arange(batch, device=q.device) * m).view(batch, 1, 1)
    keys = torch.cat([pos.unsqueeze(-1), neg], dim=-1) + batch_offsets
    coefs = torch.cat([-coef.sum(-1, keepdim=True), coef], dim=-1)
    keys = torch.where(coefs != 0, keys, batch * m).flatten()
    order = torch.argsort(keys, stable=True)
    offsets = torch.searchsorted(keys[order], torch.arange(batch * m + 1, device=q.device))
    query_rows = torch.arange(batch * n, device=q.device).view(batch, n, 1).expand(batch, n, 1 + negatives).flatten()
    launch(corr_segment_sum)[lambda meta: (batch * m, triton.cdiv(d, meta["BLOCK_D"]))](
        q, offsets, query_rows[order], coefs.flatten()[order], grad_k,
        *q.stride(),
        n, d,
    )
    return grad_q, grad_k


def _stream_grid(n: int, batch: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), batch)


@on_the_inputs_device
def hardest_forward(q, k, pos, grid_h: int, grid_w: int, exclusion: int, scale: float, margin: float, *,
                    launch: Callable = _identity):
    """terms (B, N) float32 and neg (B, N) int64 (-1 where there is no term)."""
    q, k = _checked_inputs(q, k, pos)
    batch, n, d = q.shape
    m = k.shape[1]
    if grid_h < 1 or grid_w < 1 or grid_h * grid_w != m or exclusion < 0:
        raise ValueError(f"key_grid ({grid_h}, {grid_w}) must multiply to M = {m} and exclusion ({exclusion}) be >= 0")
    scale, margin = check_number("scale", scale), check_number("margin", margin)
    terms = torch.empty((batch, n), dtype=torch.float32, device=q.device)
    neg = torch.empty((batch, n), dtype=torch.int64, device=q.device)
    if terms.numel() == 0:
        return terms, neg
    launch(_tuned(corr_hardest_fwd))[_stream_grid(n, batch)](
        q, k, pos.contiguous(), terms, neg,
        *q.stride(), *k.stride(),
        n, m, d,
        grid_w, exclusion,
        float(scale), float(margin),
        DOT_PRECISION=_dot_precision(q.dtype, get_options()),
    )
    return terms, neg


@on_the_inputs_device
def nll_forward(q, k, pos, scale: float, *, launch: Callable = _identity):
    """terms (B, N) and lse (B, N), float32."""
    q, k = _checked_inputs(q, k, pos)
    scale = check_number("scale", scale)
    batch, n, d = q.shape
    m = k.shape[1]
    terms = torch.empty((batch, n), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, n), dtype=torch.float32, device=q.device)
    if terms.numel() == 0:
        return terms, lse
    launch(_tuned(corr_nll_fwd))[_stream_grid(n, batch)](
        q, k, pos.contiguous(), terms, lse,
        *q.stride(), *k.stride(),
        n, m, d,
        float(scale),
        DOT_PRECISION=_dot_precision(q.dtype, get_options()),
    )
    return terms, lse


@on_the_inputs_device
def nll_loss(q, k, pos, scale: float, with_grad: bool, *, launch: Callable = _identity):
    """loss () float32: the mean of the valid terms; with ``with_grad`` its gradients (float32,
    shaped like q and k), else empty tensors. The gradients are the backward kernels run right
    away with the weight 1 / (number of valid rows), so the op's backward only scales them (the
    CPU backend computes them in the forward's pass; here the kernels are the same either way)."""
    terms, lse = nll_forward(q, k, pos, scale, launch=launch)
    inv_count = 1.0 / (pos >= 0).sum().clamp_min(1).to(torch.float32)
    loss = terms.sum() * inv_count
    if not with_grad:
        return loss, q.new_empty((0,), dtype=torch.float32), q.new_empty((0,), dtype=torch.float32)
    grad_q, grad_k = nll_backward(inv_count.expand(terms.shape), q, k, pos, lse, scale, launch=launch)
    return loss, grad_q, grad_k


@on_the_inputs_device
def nll_backward(grad_terms, q, k, pos, lse, scale: float, *, launch: Callable = _identity):
    """(grad_q, grad_k) shaped like (q, k), contiguous float32."""
    q, k = _checked_inputs(q, k, pos)
    batch, n, d = q.shape
    m = k.shape[1]
    _check_stat("grad_terms", grad_terms, (batch, n))
    _check_stat("lse", lse, (batch, n))
    grad_q = torch.empty((batch, n, d), dtype=torch.float32, device=q.device)
    grad_k = torch.empty((batch, m, d), dtype=torch.float32, device=q.device)
    if q.numel() == 0:  # no query: every gradient is zero
        return grad_q, grad_k.zero_()
    pos = pos.contiguous()
    weight = torch.where(pos >= 0, grad_terms, 0.0).contiguous()  # rows without a term pass no gradient
    lse = lse.contiguous()
    precision = _dot_precision(q.dtype, get_options())
    launch(_tuned(corr_nll_bwd_dq))[lambda meta: (triton.cdiv(d, meta["BLOCK_C"]), triton.cdiv(n, meta["BLOCK_M"]), batch)](
        q, k, pos, weight, lse, grad_q,
        *q.stride(), *k.stride(),
        n, m, d,
        float(scale),
        DOT_PRECISION=precision,
    )
    launch(_tuned(corr_nll_bwd_dk))[lambda meta: (triton.cdiv(d, meta["BLOCK_C"]), triton.cdiv(m, meta["BLOCK_N"]), batch)](
        q, k, pos, weight, lse, grad_k,
        *q.stride(), *k.stride(),
        n, m, d,
        float(scale),
        DOT_PRECISION=precision,
    )
    return grad_q, grad_k
