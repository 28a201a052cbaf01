"""correspondence_loss: the reference against its definition, the cpp backend against the
reference, registration (gradcheck, opcheck, torch.compile) and input checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import assert_close_to_reference
from sketchcolor import reference
from sketchcolor.ops import _backends, correspondence_loss
from sketchcolor.ops.correspondence_loss import FWD_OP, _fused_ops
from sketchcolor.testing import compare_mean_loss

# (B, H or None, N, M, key_grid, D): odd N and M, one query or one key row, N > 128 and
# M > 256 (several query and key tiles), D = 992.
SHAPES = [
    (1, None, 1, 7, (1, 7), 16),
    (2, None, 37, 45, (5, 9), 20),
    (1, 2, 33, 63, (7, 9), 24),
    (1, None, 129, 300, (15, 20), 992),
    (2, None, 200, 257, (1, 257), 64),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# name -> keyword arguments (neg is filled in by make_case with T negatives).
MODES = {
    "triplet_t1": dict(mode="triplet", negatives=1),
    "triplet_t4": dict(mode="triplet", negatives=4),
    "hardest": dict(mode="triplet", hardest=True),
    "nll": dict(mode="nll"),
}


def make_case(batch, heads, n, m, key_grid, d, dtype, mode, negatives=None, hardest=False, margin=None, device="cpu"):
    """Fresh inputs and the keyword arguments of the loss: about 1/5 of pos and neg are -1."""
    lead = (batch,) if heads is None else (batch, heads)
    q = torch.randn(*lead, n, d, dtype=dtype).to(device).requires_grad_()
    k = torch.randn(*lead, m, d, dtype=dtype).to(device).requires_grad_()
    pos = torch.randint(0, m, (batch, n))
    pos[torch.rand(batch, n) < 0.2] = -1
    pos = pos.to(device)
    kwargs = dict(mode=mode)
    if margin is not None:
        kwargs["margin"] = margin
    if negatives is not None:
        neg = torch.randint(0, m, (batch, n, negatives))
        neg[torch.rand(batch, n, negatives) < 0.2] = -1
        kwargs["neg"] = neg.to(device)
    if hardest:
        kwargs.update(hardest=True, key_grid=key_grid)
    return q, k, pos, kwargs


def valid_count(pos, kwargs, heads=1):
    """How many terms the mean divides by (for hardest: the rows with a pos, an upper bound)."""
    if "neg" in kwargs:
        return int(((pos >= 0).unsqueeze(-1) & (kwargs["neg"] >= 0)).sum()) * heads
    return int((pos >= 0).sum()) * heads


def loss_and_grads(fn, q, k, upstream):
    """The loss and the gradients of upstream * loss with respect to q and k."""
    loss = fn(q, k)
    grads = torch.autograd.grad(loss, (q, k), torch.as_tensor(upstream, dtype=loss.dtype, device=loss.device))
    return (loss, *grads)


def assert_loss_close(loss, exact, q, k, scale=None):
    """The loss value against the float64 reference, by the scalar-mean rule (sketchcolor.testing)."""
    assert loss.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    comparison = compare_mean_loss(loss, exact, q, k, scale)
    assert comparison.passed, comparison.describe("loss")


def compare_with_reference(q, k, pos, kwargs, impl="cpp"):
    """Loss, grad_q and grad_k of ``impl`` vs the float64 reference, by the 2x rule.

    The upstream gradient count / scale makes the gradients those of the sum of the raw dot
    products: O(1) entries, so the absolute slack of the rule is small next to them.
    """
    heads = q.shape[1] if q.dim() == 4 else 1
    upstream = max(valid_count(pos, kwargs, heads), 1) * math.sqrt(q.shape[-1])
    fused = loss_and_grads(lambda a, b: correspondence_loss(a, b, pos, impl=impl, **kwargs), q, k, upstream)
    exact_q, exact_k = (t.detach().double().requires_grad_() for t in (q, k))
    exact = loss_and_grads(lambda a, b: reference.correspondence_loss(a, b, pos, **kwargs), exact_q, exact_k, upstream)
    same = loss_and_grads(lambda a, b: reference.correspondence_loss(a, b, pos, **kwargs), q, k, upstream)
    assert_loss_close(fused[0], exact[0], q, k, kwargs.get("scale"))
    for name, a, e, s in zip(("grad_q", "grad_k"), fused[1:], exact[1:], same[1:]):
        assert_close_to_reference(name, a, e, s)


def hardest_negatives(q, k, pos, key_grid, exclusion=1, scale=None, impl="cpp"):
    """The negatives the ``impl`` kernel picks, (B, [H,] N), -1 for none."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    rows = q.shape[:-1]
    flat_pos = reference.broadcast_heads(pos, rows).reshape(-1, rows[-1])
    _, neg = _fused_ops(impl).hardest_fwd(
        q.detach().reshape(-1, *q.shape[-2:]), k.detach().reshape(-1, *k.shape[-2:]), flat_pos,
        *key_grid, exclusion, scale, 12.0,
    )
    return neg.reshape(rows)


def check_hardest(q, k, pos, kwargs, impl="cpp"):
    """Hardest mode in any precision: the chosen negatives are valid and maximal up to the
    rounding of the scores, and loss and gradients match the reference triplet loss with those
    negatives (in float64 the choice must equal the reference's exactly).

    Comparing against a fixed choice keeps the test meaningful in low precision, where a near
    tie between two keys may be resolved differently by different roundings.
    """
    grid, exclusion = kwargs["key_grid"], kwargs.get("exclusion", 1)
    chosen = hardest_negatives(q, k, pos, grid, exclusion, impl=impl)
    scores = reference.attention_scores(q.detach().double(), k.detach().double())  # (B, [H,] N, M)
    full_pos = reference.broadcast_heads(pos, chosen.shape)
    keys = torch.arange(k.shape[-2], device=k.device)
    cell_distance = torch.maximum(
        (full_pos.unsqueeze(-1) // grid[1] - keys // grid[1]).abs(), (full_pos.unsqueeze(-1) % grid[1] - keys % grid[1]).abs()
    )
    candidate = (cell_distance > exclusion) & (full_pos >= 0).unsqueeze(-1)
    has_candidate = candidate.any(-1)
    assert torch.equal(chosen >= 0, has_candidate), "a negative must exist exactly where a candidate does"
    picked = chosen.clamp_min(0).unsqueeze(-1)
    assert candidate.gather(-1, picked).squeeze(-1)[has_candidate].all(), "chosen negative inside the window"
    best = scores.masked_fill(~candidate, -math.inf).amax(-1)
    low_precision_scores = reference.attention_scores(q.detach(), k.detach()).double()
    slack = 2 * (low_precision_scores - scores).abs().max().item() + 1e-12
    assert (scores.gather(-1, picked).squeeze(-1) >= best - slack)[has_candidate].all(), "chosen negative not maximal"
    if q.dtype == torch.float64:
        expected = scores.masked_fill(~candidate, -math.inf).argmax(-1)
        assert torch.equal(chosen[has_candidate], expected[has_candidate])
    sampled = {name: value for name, value in kwargs.items() if name not in ("hardest", "key_grid", "exclusion")}
    sampled["neg"] = chosen.unsqueeze(-1)
    upstream = max(int((chosen >= 0).sum()), 1) * math.sqrt(q.shape[-1])
    fused = loss_and_grads(lambda a, b: correspondence_loss(a, b, pos, impl=impl, **kwargs), q, k, upstream)
    exact_q, exact_k = (t.detach().double().requires_grad_() for t in (q, k))
    exact = loss_and_grads(lambda a, b: reference.correspondence_loss(a, b, pos, **sampled), exact_q, exact_k, upstream)
    same = loss_and_grads(lambda a, b: reference.correspondence_loss(a, b, pos, **sampled), q, k, upstream)
    assert_loss_close(fused[0], exact[0], q, k)
    for name, a, e, s in zip(("grad_q", "grad_k"), fused[1:], exact[1:], same[1:]):
        assert_close_to_reference(name, a, e, s)


def check_against_reference(q, k, pos, kwargs, impl="cpp"):
    """check_hardest for the hardest mode (its choice of negatives may differ from the
    reference's in low precision), compare_with_reference for the others."""
    if kwargs.get("hardest"):
        check_hardest(q, k, pos, kwargs, impl)
    else:
        compare_with_reference(q, k, pos, kwargs, impl)


# ----------------------------------------------------------------------------------------
# The reference is the definition
# ----------------------------------------------------------------------------------------


def definition_by_loops(q, k, pos, mode, neg=None, margin=12.0, hardest=False, key_grid=None, exclusion=1):
    """The loss written term by term from the issue's text, in float64 (3-D inputs)."""
    q, k = q.double(), k.double()
    scale = 1 / math.sqrt(q.shape[-1])
    terms = []
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            p = int(pos[b, i])
            if p < 0:
                continue
            s = [scale * float(q[b, i].detach() @ k[b, j].detach()) for j in range(k.shape[1])]
            if mode == "nll":
                terms.append(math.log(sum(math.exp(v) for v in s)) - s[p])
            elif hardest:
                w = key_grid[1]
                outside = [j for j in range(k.shape[1]) if max(abs(j // w - p // w), abs(j % w - p % w)) > exclusion]
                if outside:
                    j = max(outside, key=lambda j: (s[j], -j))  # the largest score, then the lowest index
                    terms.append(max(0.0, s[j] - s[p] + margin))
            else:
                terms.extend(max(0.0, s[int(j)] - s[p] + margin) for j in neg[b, i] if j >= 0)
    return sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize("mode", list(MODES))
def test_reference_matches_definition(mode):
    q, k, pos, kwargs = make_case(2, None, 9, 12, (3, 4), 5, torch.float64, margin=1.5, **MODES[mode])
    loss = reference.correspondence_loss(q, k, pos, **kwargs)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(definition_by_loops(q, k, pos, **kwargs), rel=1e-12, abs=1e-12)
    assert 0 < loss.item()


def test_reference_low_precision_returns_float32():
    q, k, pos, kwargs = make_case(1, None, 5, 6, (2, 3), 8, torch.bfloat16, **MODES["nll"])
    assert reference.correspondence_loss(q, k, pos, **kwargs).dtype == torch.float32


# ----------------------------------------------------------------------------------------
# cpp against the reference
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpp_matches_reference(shape, dtype, mode):
    q, k, pos, kwargs = make_case(*shape, dtype, **MODES[mode])
    check_against_reference(q, k, pos, kwargs)


@pytest.mark.parametrize("mode", list(MODES))
def test_cpp_small_margin_leaves_some_terms_inactive(mode):
    # margin 0.3: about half the triplet terms are 0 and must pass no gradient.
    q, k, pos, kwargs = make_case(2, None, 70, 90, (9, 10), 32, torch.float32, margin=0.3, **MODES[mode])
    check_against_reference(q, k, pos, kwargs)


@pytest.mark.parametrize("mode", list(MODES))
def test_cpp_index_tensors_with_head_axis(mode):
    q, k, pos, kwargs = make_case(2, 3, 17, 20, (4, 5), 8, torch.float64, margin=2.0, **MODES[mode])
    pos = torch.randint(-1, 20, (2, 3, 17))  # a different correspondence per head
    if "neg" in kwargs:
        kwargs["neg"] = torch.randint(-1, 20, (2, 3, 17, kwargs["neg"].shape[-1]))
    compare_with_reference(q, k, pos, kwargs)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpp_scores_low_precision_inputs_in_float32(mode, dtype):
    # As the reference does: the margin and the hardest negative's rank are differences of scores.
    # Scores rounded to bf16 moved the nll and hardest losses by ~1e-4 of their value; what is left
    # is the order of float32 sums.
    torch.manual_seed(0)
    q, k, pos, kwargs = make_case(2, None, 64, 48, (6, 8), 40, dtype, margin=4.0, **MODES[mode])
    loss = correspondence_loss(q, k, pos, impl="cpp", **kwargs)
    torch.testing.assert_close(loss, correspondence_loss(q, k, pos, impl="reference", **kwargs), rtol=2e-6, atol=0)


def test_cpp_hardest_negative_is_the_float32_best_for_low_precision_inputs():
    # Rounded to bf16, q.k of this case ranks keys otherwise on one row, and the hardest negative
    # there (the key its gradient goes to) moved.
    torch.manual_seed(0)
    q, k = torch.randn(1, 64, 32).bfloat16(), torch.randn(1, 48, 32).bfloat16()
    pos = torch.randint(0, 48, (1, 64))
    _, neg = torch.ops.sketchcolor.corr_hardest_fwd(q, k, pos, 6, 8, 0, 32**-0.5, 12.0)
    dots = (q.float() @ k.float().mT)[0]
    scores, rounded = dots * 32**-0.5, dots.bfloat16().float() * 32**-0.5
    for candidates in (scores, rounded):
        candidates.scatter_(-1, pos[0][:, None], float("-inf"))  # exclusion 0: all but the true key
    assert not torch.equal(rounded.argmax(-1), scores.argmax(-1))  # the case tells the two apart
    assert torch.equal(neg[0], scores.argmax(-1))


def test_cpp_float16():
    q, k, pos, kwargs = make_case(1, None, 40, 50, (5, 10), 64, torch.float16, **MODES["nll"])
    compare_with_reference(q, k, pos, kwargs)


@pytest.mark.parametrize("mode", list(MODES))
def test_cpp_non_contiguous_inputs(mode):
    q, k, pos, kwargs = make_case(2, None, 30, 40, (5, 8), 16, torch.float64, margin=3.0, **MODES[mode])
    q = q.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (B, N, D) with N-major storage
    k = k.detach().mT.contiguous().mT.requires_grad_()  # last-dim stride != 1
    assert not q.is_contiguous() and not k.is_contiguous()
    compare_with_reference(q, k, pos, kwargs)


@pytest.mark.parametrize("scale", [0.05, 2.0, -0.3])
def test_cpp_custom_scale_and_large_scores(scale):
    # scale 2 with D = 64: scores of size ~16, where a naive exp would overflow float32 sums.
    for mode in ("nll", "triplet_t4"):
        q, k, pos, kwargs = make_case(1, None, 50, 300, (15, 20), 64, torch.float32, **MODES[mode])
        compare_with_reference(q, k, pos, {**kwargs, "scale": scale})


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_cpp_thread_counts(threads, batch):
    # M = 1100 is five key tiles: the nll backward splits them into chunks per thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for mode in MODES:
            q, k, pos, kwargs = make_case(batch, None, 300, 1100, (22, 50), 32, torch.float64, margin=4.0, **MODES[mode])
            compare_with_reference(q, k, pos, kwargs)
    finally:
        torch.set_num_threads(previous)


def check_deterministic(q, k, pos, kwargs, impl, between=None):
    """Two runs give bitwise equal loss and gradients; the first 40 queries share key 7, so the
    key-gradient scatter sums many contributions into one row. ``between`` runs between the two
    (the CUDA emulator's tests change the order threads and blocks run in there)."""
    pos[0, :40] = 7
    first = loss_and_grads(lambda a, b: correspondence_loss(a, b, pos, impl=impl, **kwargs), q, k, 1.0)
    if between is not None:
        between()
    second = loss_and_grads(lambda a, b: correspondence_loss(a, b, pos, impl=impl, **kwargs), q, k, 1.0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def check_cuda_graph_replay(mode, impl, dtype):
    """The loss and its gradients captured in a CUDA graph and replayed on new values of q and k
    equal eager calls on those values (bitwise: the backends are deterministic). Under capture a
    copy to the host would end the capture, so the index range checks run on the device."""
    q, k, pos, kwargs = make_case(2, None, 37, 45, (5, 9), 24, dtype, **MODES[mode], device="cuda")

    def step():
        loss = correspondence_loss(q, k, pos, impl=impl, **kwargs)
        return (loss, *torch.autograd.grad(loss, (q, k)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()   # outside the capture: ops registered, kernels loaded, autotuning done
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
    graph.replay()
    expected = step()
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode", list(MODES))
def test_cpp_deterministic(mode):
    check_deterministic(*make_case(1, None, 300, 1100, (22, 50), 32, torch.float32, **MODES[mode]), impl="cpp")


def check_small_margin_and_strided_inputs(mode, impl, dtype, device="cpu"):
    """A margin of 0.3 (some terms inactive), k with last-dim stride != 1 and q every other row
    of a wider tensor (strided rows), against the reference."""
    q, k, pos, kwargs = make_case(2, None, 30, 40, (5, 8), 16, dtype, margin=0.3, **MODES[mode], device=device)
    k = k.detach().mT.contiguous().mT.requires_grad_()
    q = torch.randn(2, 60, 16, dtype=dtype, device=device)[:, ::2].requires_grad_()
    check_against_reference(q, k, pos, kwargs, impl)


def check_triplet_backward_ignores_missing_keys(triplet_bwd, device="cpu"):
    """triplet_bwd called directly with positive terms where pos or neg is -1 (a forward writes 0
    there) gives what the cpu kernel gives: only entries with both keys get a gradient, and no key
    row -1 is touched."""
    pos = torch.tensor([[-1, 0, 1, 2], [3, -1, 0, 1]])
    neg = torch.tensor([[[1], [2], [-1], [0]], [[2], [4], [-1], [3]]])
    q = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    terms = torch.ones(2, 4, 1)
    args = (terms, q, k, pos, neg, terms)   # grad_terms, q, k, pos, neg, terms
    expected = torch.ops.sketchcolor.corr_triplet_bwd(*args, 0.5)
    got = triplet_bwd(*(t.to(device) for t in args), 0.5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu().float(), e.float(), atol=1e-2, rtol=1e-2)


def check_hardest_ties(dtype, impl="cpp", device="cpu"):
    """Exact ties: integer entries and scale 1 make every score exact in every dtype; duplicated
    key rows tie with their originals and the kernel must pick the lowest index."""
    n, m, grid, d = 40, 300, (15, 20), 16
    q = torch.randint(-1, 2, (2, n, d)).to(dtype)
    k = torch.randint(-1, 2, (2, m, d)).to(dtype)
    # Keys 150..299 duplicate keys 0..149: ties within a key tile and across tiles (256-key tiles
    # on the cpu, 128 on cuda).
    k[:, 150:] = k[:, :150]
    pos = torch.randint(0, m, (2, n))
    chosen = hardest_negatives(q.to(device), k.to(device), pos.to(device), grid, exclusion=1, scale=1.0, impl=impl).cpu()
    scores = q.double() @ k.double().mT
    keys = torch.arange(m)
    distance = torch.maximum(
        (pos.unsqueeze(-1) // grid[1] - keys // grid[1]).abs(), (pos.unsqueeze(-1) % grid[1] - keys % grid[1]).abs()
    )
    masked = scores.masked_fill(distance <= 1, -math.inf)
    is_max = masked == masked.amax(-1, keepdim=True)
    assert (is_max.sum(-1) > 1).float().mean() > 0.8, "the test needs ties in most rows"
    lowest = torch.where(is_max, keys, m).amin(-1)
    assert torch.equal(chosen, lowest)
    # The reference agrees (every term is an exact integer; only the mean's division rounds),
    # and the loss puts the whole gradient on the lowest tied key (the margin keeps every term
    # active).
    kwargs = dict(scale=1.0, hardest=True, key_grid=grid, margin=100.0)
    expected = reference.correspondence_loss(q.double(), k.double(), pos, **kwargs)
    k = k.to(device).requires_grad_()
    loss = correspondence_loss(q.to(device), k, pos.to(device), impl=impl, **kwargs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-7)
    (grad_k,) = torch.autograd.grad(loss, k)
    grad_k = grad_k.cpu()
    receives = grad_k.abs().sum(-1) > 0
    for b in range(2):
        assert receives[b, chosen[b]].all()
        # The later copies are never chosen: only a pos can give them a gradient.
        copies = torch.arange(150, m)
        assert not receives[b, copies[~torch.isin(copies, torch.cat([chosen[b], pos[b]]))]].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hardest_ties_pick_the_lowest_index(dtype):
    check_hardest_ties(dtype)


def check_nan_reaches_the_loss(impl, dtype=torch.float32, device="cpu"):
    """A NaN in one query row, or in one key row that a term reads, makes every mode's loss NaN, as
    in the reference (its relu and torch.argmax keep NaN): no backend may turn it into a zero term
    or skip the key in the hardest-negative search."""
    for mode, options in MODES.items():
        for poisoned in ("q", "k"):
            q, k, pos, kwargs = make_case(2, None, 9, 12, (3, 4), 8, dtype, **options, device=device)
            # Query 0 of batch 0 sits on cell (1, 1); key 11, cell (2, 3), is outside its window.
            pos[0, 0] = 5
            if "neg" in kwargs:
                kwargs["neg"][0, 0] = 11
            with torch.no_grad():
                if poisoned == "q":
                    q[0, 0, 3] = math.nan
                else:
                    k[0, 11, 3] = math.nan
            exact = correspondence_loss(q.detach().double(), k.detach().double(), pos, impl="reference", **kwargs)
            loss = correspondence_loss(q, k, pos, impl=impl, **kwargs)
            assert torch.isnan(exact), (mode, poisoned, exact)
            assert torch.isnan(loss), f"{impl} {mode}: a NaN in {poisoned} gave the loss {loss.item()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_reaches_the_loss(dtype):
    check_nan_reaches_the_loss("cpp", dtype)


# ----------------------------------------------------------------------------------------
# Validity: pos = -1, neg = -1, windows covering the grid, empty tensors
# ----------------------------------------------------------------------------------------


def check_all_invalid(mode, impl, dtype=torch.float32, device="cpu"):
    """Every pos is -1: a float32 loss of exactly 0 and exactly zero gradients."""
    q, k, pos, kwargs = make_case(2, None, 9, 12, (3, 4), 8, dtype, **MODES[mode], device=device)
    pos = torch.full_like(pos, -1)
    loss, grad_q, grad_k = loss_and_grads(lambda a, b: correspondence_loss(a, b, pos, impl=impl, **kwargs), q, k, 1.0)
    assert loss.item() == 0 and loss.dtype == torch.float32
    assert torch.equal(grad_q, torch.zeros_like(q)) and torch.equal(grad_k, torch.zeros_like(k))


def check_empty(mode, impl, batch, n, dtype=torch.float32, device="cpu"):
    """No queries (n = 0) or no batch: a loss of 0 whose backward gives k a zero gradient."""
    q, k, pos, kwargs = make_case(batch, None, n, 6, (2, 3), 8, dtype, **MODES[mode], device=device)
    loss = correspondence_loss(q, k, pos, impl=impl, **kwargs)
    assert loss.item() == 0
    loss.backward()
    assert not k.grad.any()


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("mode", list(MODES))
def test_all_invalid_gives_zero_loss_and_zero_grads(mode, impl):
    check_all_invalid(mode, impl)


def check_all_negatives_missing(impl, dtype=torch.float64, device="cpu"):
    """Sampled negatives all -1: no term, loss 0 and zero gradients."""
    q, k, pos, kwargs = make_case(2, None, 9, 12, (3, 4), 8, dtype, **MODES["triplet_t4"], device=device)
    kwargs["neg"] = torch.full_like(kwargs["neg"], -1)
    loss, grad_q, grad_k = loss_and_grads(lambda a, b: correspondence_loss(a, b, pos, impl=impl, **kwargs), q, k, 1.0)
    assert loss.item() == 0 and not grad_q.any() and not grad_k.any()


def check_hardest_without_candidates(impl, dtype=torch.float64, device="cpu", rel=1e-12):
    """Queries whose exclusion window covers every key have no term and are not counted."""
    # A 3 x 4 grid and exclusion 2: the window spans every row, so only a pos in column 0 has a
    # key outside it (column 3) and vice versa; the other six queries have no term.
    q, k, pos, kwargs = make_case(1, None, 12, 12, (3, 4), 8, dtype, margin=50.0, **MODES["hardest"], device=device)
    pos = torch.arange(12, device=device).unsqueeze(0)  # each query on its own cell
    loss = correspondence_loss(q, k, pos, impl=impl, exclusion=2, **kwargs)
    has_candidate = torch.tensor([max(abs(r - pr), abs(c - pc)) > 2 for pr in range(3) for pc in range(4)
                                  for r in range(3) for c in range(4)]).view(12, 12).any(-1).to(device)
    assert has_candidate.sum() == 6  # the cells in columns 0 and 3 see column 3 or 0
    reduced = correspondence_loss(q[:, has_candidate], k, pos[:, has_candidate], impl=impl, exclusion=2, **kwargs)
    assert loss.item() == pytest.approx(reduced.item(), rel=rel)
    everything_excluded = correspondence_loss(q, k, pos, impl=impl, exclusion=3, **kwargs)
    assert everything_excluded.item() == 0


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_all_negatives_missing_gives_zero(impl):
    check_all_negatives_missing(impl)


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_hardest_without_candidates_is_excluded(impl):
    check_hardest_without_candidates(impl)


@pytest.mark.parametrize("mode", list(MODES))
def test_empty_queries_and_batches(mode):
    for batch, n in ((2, 0), (0, 5)):
        check_empty(mode, "cpp", batch, n)


def test_zero_negatives_per_query():
    q, k, pos, _ = make_case(2, None, 5, 6, (2, 3), 4, torch.float32, "triplet")
    loss = correspondence_loss(q, k, pos, neg=torch.empty(2, 5, 0, dtype=torch.int64), impl="cpp")
    assert loss.item() == 0


# ----------------------------------------------------------------------------------------
# Autograd, registration, dispatch
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_float64(mode):
    q, k, pos, kwargs = make_case(2, None, 6, 12, (3, 4), 5, torch.float64, margin=0.5, **MODES[mode])
    assert torch.autograd.gradcheck(lambda a, b: correspondence_loss(a, b, pos, impl="cpp", **kwargs), (q, k))


def test_gradcheck_with_head_axis():
    q, k, pos, kwargs = make_case(1, 2, 5, 9, (3, 3), 4, torch.float64, **MODES["hardest"])
    assert torch.autograd.gradcheck(lambda a, b: correspondence_loss(a, b, pos, impl="cpp", **kwargs), (q, k))


def test_opcheck_registered_ops():
    q, k, pos, kwargs = make_case(2, None, 9, 12, (3, 4), 8, torch.float32, **MODES["triplet_t4"])
    neg = kwargs["neg"]
    ops = torch.ops.sketchcolor
    terms = ops.corr_triplet_fwd(q.detach(), k.detach(), pos, neg, 0.3, 2.0)
    hardest_terms, hardest_neg = ops.corr_hardest_fwd(q.detach(), k.detach(), pos, 3, 4, 1, 0.3, 2.0)
    cases = [
        (ops.corr_triplet_fwd.default, (q, k, pos, neg, 0.3, 2.0)),
        (ops.corr_hardest_fwd.default, (q, k, pos, 3, 4, 1, 0.3, 2.0)),
        (ops.corr_nll_loss.default, (q, k, pos, 0.3, True)),
        (ops.corr_nll_loss.default, (q.detach(), k.detach(), pos, 0.3, False)),
        (ops.corr_triplet_bwd.default, (torch.randn_like(terms), q.detach(), k.detach(), pos, neg, terms, 0.3)),
    ]
    # Non-contiguous inputs: the fakes must promise the strides the kernels return (contiguous).
    qt, kt = (t.detach().mT.contiguous().mT for t in (q, k))
    pos_t = pos.mT.contiguous().mT
    cases += [
        (ops.corr_triplet_bwd.default, (torch.randn_like(terms), qt, kt, pos, neg, terms, 0.3)),
        (ops.corr_hardest_fwd.default, (qt, kt, pos_t, 3, 4, 1, 0.3, 2.0)),
    ]
    assert (hardest_neg >= 0).any() and hardest_terms.shape == pos.shape
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("mode", list(MODES))
def test_torch_compile(mode):
    q, k, pos, kwargs = make_case(2, None, 17, 20, (4, 5), 16, torch.float32, margin=2.0, **MODES[mode])

    def loss_fn(q, k):
        return correspondence_loss(q * 2.0, k, pos, impl="cpp", **kwargs)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = loss_and_grads(compiled, q, k, 1.0)
    expected = loss_and_grads(loss_fn, q, k, 1.0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("mode", list(MODES))
def test_torch_compile_with_margin_and_scale_that_change_between_calls(mode):
    # A margin schedule or a temperature: later calls' floats arrive symbolic; the checks take
    # them and the graph uses each call's values.
    q, k, pos, kwargs = make_case(2, None, 17, 20, (4, 5), 16, torch.float32, **MODES[mode])
    q, k = q.detach(), k.detach()

    def loss_fn(q, margin, scale):
        return correspondence_loss(q, k, pos, margin=margin, scale=scale, impl="cpp", **kwargs)

    torch._dynamo.reset()  # each mode's graphs count against one code object's recompile limit
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for margin, scale in ((12.0, 0.25), (2.5, 0.25), (1.0, 0.4)):
        expected = correspondence_loss(q, k, pos, margin=margin, scale=scale, impl="reference", **kwargs)
        torch.testing.assert_close(compiled(q, margin, scale), expected)
    # Raised while tracing: fullgraph torch.compile reports it wrapped, with the op's message.
    with pytest.raises(Exception, match="margin must be finite"):
        compiled(q, math.nan, 0.25)


@pytest.mark.parametrize("mode", list(MODES))
def test_torch_compile_checks_index_range_on_the_device(mode):
    # A traced graph cannot copy the index range to the host: the op's own range check becomes a
    # device-side assert, which on CPU tensors raises at once. Its message (no "got values in")
    # tells it from the C++ kernel's eager check, so this is the check the triton backend relies on.
    q, k, pos, kwargs = make_case(2, None, 17, 20, (4, 5), 16, torch.float32, margin=2.0, **MODES[mode])
    name = "neg" if "neg" in kwargs else "pos"
    bad = (kwargs[name] if name == "neg" else pos).clone()
    bad.view(-1)[5] = 20

    def loss_fn(q, k, index):
        if name == "neg":
            return correspondence_loss(q, k, pos, impl="cpp", **{**kwargs, "neg": index})
        return correspondence_loss(q, k, index, impl="cpp", **kwargs)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=rf"^{name} values must be in \[-1, M\) = \[-1, 20\)$"):
        compiled(q, k, bad)


@pytest.mark.parametrize("mode", list(MODES))
def test_only_requested_gradients_and_no_double_backward(mode):
    q, k, pos, kwargs = make_case(1, None, 5, 7, (1, 7), 6, torch.float64, margin=20.0, **MODES[mode])
    k.requires_grad_(False)
    correspondence_loss(q, k, pos, impl="cpp", **kwargs).backward()
    assert q.grad is not None and q.grad.any() and k.grad is None
    # The triplet backward ops refuse to be differentiated; nll's backward refuses create_graph.
    with pytest.raises(RuntimeError, match="double backward"):
        (grad_q,) = torch.autograd.grad(correspondence_loss(q, k, pos, impl="cpp", **kwargs), q, create_graph=True)
        grad_q.sum().backward()


def test_nll_without_grad_mode_computes_no_gradient():
    q, k, pos, kwargs = make_case(1, None, 50, 70, (7, 10), 16, torch.float64, **MODES["nll"])
    with torch.no_grad():
        loss_without = correspondence_loss(q, k, pos, impl="cpp", **kwargs)
    loss, grad_q, grad_k = torch.ops.sketchcolor.corr_nll_loss(q, k, pos, 0.25, False)
    assert grad_q.numel() == 0 and grad_k.numel() == 0
    assert loss_without.item() == pytest.approx(correspondence_loss(q, k, pos, impl="cpp", **kwargs).item(), rel=1e-14)
    with pytest.raises(RuntimeError, match="with_grad=False: it has no gradient"):
        loss.backward()


def test_auto_picks_cpp_on_cpu(recwarn):
    q, k, pos, kwargs = make_case(1, None, 5, 7, (1, 7), 6, torch.float32, **MODES["triplet_t4"])
    auto = correspondence_loss(q, k, pos, **kwargs)
    assert torch.equal(auto, correspondence_loss(q, k, pos, impl="cpp", **kwargs))
    assert not [w for w in recwarn if "reference" in str(w.message)]


def test_auto_on_cuda_tensors_without_cuda_kernels_picks_triton(monkeypatch):
    # Backend choice looks at the device type, the dtype and the build only: no GPU is needed. As if
    # the extension had been built without CUDA kernels (a CUDA build would ask the driver next).
    monkeypatch.setattr(_backends._extension, "has_kernel", lambda op_name, dispatch_key: False)
    assert _backends.resolve("auto", torch.device("cuda"), FWD_OP, torch.bfloat16) == "triton"


def test_auto_on_cuda_tensors_picks_by_dtype(monkeypatch):
    # As if the extension had CUDA kernels: they take half precision only, so float32 goes to triton.
    monkeypatch.setattr(_backends._extension, "load_error", lambda: None)
    monkeypatch.setattr(_backends._extension, "has_kernel", lambda op_name, dispatch_key: True)
    monkeypatch.setattr(_backends, "_cuda_device", lambda device: ("NVIDIA H100 80GB HBM3", (9, 0), 232448))
    cuda = torch.device("cuda")
    assert _backends.resolve("auto", cuda, FWD_OP, torch.bfloat16) == "cuda"
    assert _backends.resolve("auto", cuda, FWD_OP, torch.float16) == "cuda"
    assert _backends.resolve("auto", cuda, FWD_OP, torch.float32) == "triton"
    with pytest.raises(RuntimeError, match="impl='cuda' takes float16 or bfloat16 tensors, got float32"):
        _backends.resolve("cuda", cuda, FWD_OP, torch.float32)


def test_auto_on_cuda_float64_falls_back_to_the_reference(monkeypatch):
    # Neither GPU backend takes float64 (a gradcheck on a GPU): auto warns and runs the reference
    # instead of handing the tensors to a backend that raises.
    pytest.importorskip("triton")
    monkeypatch.setattr(_backends._extension, "load_error", lambda: None)
    monkeypatch.setattr(_backends._extension, "has_kernel", lambda op_name, dispatch_key: True)
    monkeypatch.setattr(_backends, "_cuda_device", lambda device: ("NVIDIA H100 80GB HBM3", (9, 0), 232448))
    _backends._warn_fallback.cache_clear()
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="triton: impl='triton' takes float16, bfloat16 or float32 tensors, got float64"):
        assert _backends.resolve("auto", cuda, FWD_OP, torch.float64) == "reference"
    with pytest.raises(RuntimeError, match="impl='triton' takes float16, bfloat16 or float32 tensors, got float64"):
        _backends.resolve("triton", cuda, FWD_OP, torch.float64)


@pytest.mark.parametrize(
    "gpu",
    [("NVIDIA A100-SXM4-80GB", (8, 0), 166912), ("NVIDIA GeForce RTX 4090", (8, 9), 101376),
     ("NVIDIA A10", (8, 6), 101376), ("NVIDIA H100 80GB HBM3", (9, 0), 232448),
     ("NVIDIA GeForce RTX 5090", (12, 0), 101376)],
    ids=lambda gpu: gpu[0],
)
def test_auto_picks_the_cuda_backend_where_its_kernels_run(monkeypatch, gpu):
    # 8.6, 8.9 and 12.0 grant 99 KiB per block: the launchers take the compact (2-stage) kernels there.
    monkeypatch.setattr(_backends._extension, "load_error", lambda: None)
    monkeypatch.setattr(_backends._extension, "has_kernel", lambda op_name, dispatch_key: True)
    monkeypatch.setattr(_backends, "_cuda_device", lambda device: gpu)
    assert _backends.resolve("auto", torch.device("cuda"), FWD_OP, torch.bfloat16) == "cuda"


@pytest.mark.parametrize(
    "gpu, reason",
    [
        # No 8.x GPU grants less than 99 KiB per block; one that did could not launch the kernels.
        (("an 8.x GPU with 64 KiB per block", (8, 0), 65536), r"needs 84 KiB .* 64 KiB per block grants 64 KiB"),
        # No machine code for 7.5 or 11.0 in this build (a cubin runs only on its own major).
        (("Tesla T4", (7, 5), 65536), r"10.x \(sm_100\) and 12.x \(sm_120\); Tesla T4 is 7.5"),
        (("NVIDIA Jetson AGX Thor", (11, 0), 232448), r"8.x \(sm_80\), 9.0 \(sm_90a\), .*Thor is 11.0"),
    ],
)
def test_auto_skips_the_cuda_backend_where_its_kernels_cannot_run(monkeypatch, gpu, reason):
    monkeypatch.setattr(_backends._extension, "load_error", lambda: None)
    monkeypatch.setattr(_backends._extension, "has_kernel", lambda op_name, dispatch_key: True)
    monkeypatch.setattr(_backends, "_cuda_device", lambda device: gpu)
    cuda = torch.device("cuda")
    assert _backends.resolve("auto", cuda, FWD_OP, torch.bfloat16) == "triton"
    with pytest.raises(RuntimeError, match=reason):
        _backends.resolve("cuda", cuda, FWD_OP, torch.bfloat16)


@pytest.mark.parametrize("gpu", [("NVIDIA B200", (10, 0), 232448), ("NVIDIA B300", (10, 3), 232448)], ids=lambda gpu: gpu[0])
def test_auto_prefers_triton_on_10x_where_cuda_also_runs(monkeypatch, gpu):
    # Triton multiplies with tcgen05 there, the cuda kernels with mma.sync; impl="cuda" still runs.
    monkeypatch.setattr(_backends._extension, "load_error", lambda: None)
    monkeypatch.setattr(_backends._extension, "has_kernel", lambda op_name, dispatch_key: True)
    monkeypatch.setattr(_backends, "_cuda_device", lambda device: gpu)
    cuda = torch.device("cuda")
    assert _backends.resolve("auto", cuda, FWD_OP, torch.bfloat16) == "triton"
    assert _backends.resolve("cuda", cuda, FWD_OP, torch.bfloat16) == "cuda"
    # Without Triton, auto takes the cuda kernels rather than the reference.
    monkeypatch.setattr(_backends.importlib.util, "find_spec", lambda name: None)
    assert _backends.resolve("auto", cuda, FWD_OP, torch.bfloat16) == "cuda"


def test_triton_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, pos, kwargs = make_case(1, None, 5, 7, (1, 7), 6, torch.float32, **MODES["nll"])
    with pytest.raises(RuntimeError, match="impl='triton' is not available: .*CUDA"):
        correspondence_loss(q, k, pos, impl="triton", **kwargs)


# ----------------------------------------------------------------------------------------
# Bad inputs: every check names the argument
# ----------------------------------------------------------------------------------------


def _base():
    q = torch.randn(2, 5, 4)
    k = torch.randn(2, 6, 4)
    pos = torch.randint(-1, 6, (2, 5))
    neg = torch.randint(-1, 6, (2, 5, 3))
    return q, k, pos, dict(neg=neg)


def _replace(**changes):
    def corrupt(q, k, pos, kwargs):
        args = dict(q=q, k=k, pos=pos)
        for name, change in changes.items():
            if name in args:
                args[name] = change(args[name])
            elif callable(change) and name in kwargs:
                kwargs[name] = change(kwargs[name])
            else:
                kwargs[name] = change
        return args["q"], args["k"], args["pos"], {name: value for name, value in kwargs.items() if value is not ...}

    return corrupt


BAD_INPUTS = [
    ("q must have rank", _replace(q=lambda q: q[0])),
    ("q must have dtype", _replace(q=lambda q: q.long())),
    ("q must be a torch.Tensor", _replace(q=lambda q: q.tolist())),
    ("k must have rank", _replace(k=lambda k: k[0])),
    ("k has dtype .* but q has", _replace(k=lambda k: k.double())),
    ("k: leading dims", _replace(k=lambda k: k[:1])),
    ("k: head dim D", _replace(k=lambda k: k[..., :3])),
    ("k: M must be at least 1", _replace(k=lambda k: k[:, :0])),
    ("q: D must be at least 1", _replace(q=lambda q: q[..., :0], k=lambda k: k[..., :0])),
    ("mode must be one of", _replace(mode="hinge")),
    ("hardest must be a bool, got int", _replace(hardest=1, neg=None, key_grid=(2, 3))),
    ("hardest must be a bool, got numpy.bool", _replace(hardest=np.bool_(True), neg=None, key_grid=(2, 3))),
    ("hardest=True is a triplet option", _replace(mode="nll", hardest=True, neg=None, key_grid=(2, 3))),
    ("margin must be finite and within float32's range", _replace(margin=float("inf"))),
    ("margin must be a real number, got str", _replace(margin="12")),
    ("margin must be a real number, got bool", _replace(margin=True)),
    ("margin must be a real number, got torch.Tensor", _replace(margin=torch.tensor(1.0))),
    ("scale must be finite and within float32's range", _replace(scale=float("nan"))),
    ("scale must be finite and within float32's range", _replace(scale=1e39)),
    ("scale must be a real number, got str", _replace(scale="0.5")),
    ("scale must be a real number, got list", _replace(scale=[0.5])),
    ("scale must be a real number, got torch.Tensor", _replace(scale=torch.tensor(0.5, requires_grad=True))),
    ("exclusion must be an int >= 0", _replace(exclusion=-1)),
    ("exclusion must be an int >= 0", _replace(exclusion=1.0)),
    ("q must be a dense \\(strided\\) tensor, got layout torch.sparse_coo", _replace(q=lambda q: q.to_sparse())),
    ("k must be a dense \\(strided\\) tensor, got a nested tensor", _replace(k=lambda k: torch.nested.nested_tensor(list(k)))),
    ("pos must have dtype", _replace(pos=lambda p: p.int())),
    ("pos must have rank", _replace(pos=lambda p: p[0])),
    ("pos: leading dims", _replace(pos=lambda p: p[:, :4])),
    ("pos is on meta but q is on cpu", _replace(pos=lambda p: p.to("meta"))),
    ("pos values must be in \\[-1, M\\) = \\[-1, 6\\), got values in \\[-2", _replace(pos=lambda p: p.fill_(-2))),
    ("pos values must be in \\[-1, M\\)", _replace(pos=lambda p: p.fill_(6))),
    ("neg is required", _replace(neg=...)),
    ("neg is only used by mode='triplet' without hardest", _replace(mode="nll")),
    ("neg is only used by mode='triplet' without hardest", _replace(hardest=True, key_grid=(2, 3))),
    ("neg must have dtype", _replace(neg=lambda n: n.float())),
    ("neg must have rank", _replace(neg=lambda n: n[..., 0])),
    ("neg: leading dims", _replace(neg=lambda n: n[:1])),
    ("neg values must be in \\[-1, M\\)", _replace(neg=lambda n: n.fill_(7))),
    ("key_grid is required with hardest=True", _replace(hardest=True, neg=None)),
    ("key_grid must be a pair of positive ints", _replace(hardest=True, neg=None, key_grid=(2, 2))),
    ("key_grid must be a pair of positive ints", _replace(hardest=True, neg=None, key_grid=(2.0, 3))),
    ("key_grid must be a pair of positive ints", _replace(hardest=True, neg=None, key_grid=6)),
    ("key_grid is only used with hardest=True", _replace(key_grid=(2, 3))),
    ("impl must be one of", _replace(impl="fast")),
]


@pytest.mark.parametrize("message,corrupt", BAD_INPUTS, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_inputs_name_the_argument(message, corrupt):
    q, k, pos, kwargs = corrupt(*_base())
    kwargs.setdefault("impl", "cpp")
    with pytest.raises((ValueError, TypeError), match=message):
        correspondence_loss(q, k, pos, **kwargs)


def test_a_key_grid_whose_product_wraps_around_to_m_is_rejected():
    # 4 * (2**62 + 1) is 2**64 + 4: 4 in int64, in NumPy's arithmetic and in C++'s.
    q, k, pos = torch.randn(1, 3, 8), torch.randn(1, 4, 8), torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="key_grid must be a pair of positive ints"):
        correspondence_loss(q, k, pos, hardest=True, key_grid=(np.int64(4), np.int64(2**62 + 1)), impl="cpp")
    with pytest.raises(RuntimeError, match="key_grid \\(h, w\\) must be positive with h \\* w == M = 4, got \\(4, 4611686018427387905\\)"):
        torch.ops.sketchcolor.corr_hardest_fwd(q, k, pos, 4, 2**62 + 1, 1, 0.5, 1.0)


def test_numpy_scalars_are_numbers():
    q, k, pos, kwargs = _base()
    exact = correspondence_loss(q, k, pos, margin=1.0, scale=0.5, impl="reference", **kwargs)
    loss = correspondence_loss(q, k, pos, margin=np.float32(1.0), scale=np.float64(0.5), impl="cpp", **kwargs)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-6)
    hardest = dict(hardest=True, key_grid=(2, 3))
    exact = correspondence_loss(q, k, pos, exclusion=1, impl="reference", **hardest)
    assert correspondence_loss(q, k, pos, exclusion=np.int64(1), impl="cpp", **hardest).item() == pytest.approx(exact.item())
    numpy_grid = dict(hardest=True, key_grid=(np.int64(2), np.int32(3)))
    assert correspondence_loss(q, k, pos, impl="cpp", **numpy_grid).item() == pytest.approx(exact.item())


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_exclusion_past_the_grid_covers_it(impl):
    # Any half-width of max(h, w) or more excludes every key: no term, loss 0, even past int64.
    q, k, pos, _ = _base()
    for exclusion in (3, 2**40, 2**63, 2**70):
        loss = correspondence_loss(q, k, pos, hardest=True, key_grid=(2, 3), exclusion=exclusion, impl=impl)
        assert loss.item() == 0, exclusion


@pytest.mark.parametrize("mode", list(MODES))
def test_autocast_changes_no_backend_result(mode):
    # Autocast passes the fused backends' custom ops by, and must not reach into the reference
    # path either: its bfloat16 q and k are scored in float32, as triton's and cuda's are.
    q, k, pos, kwargs = make_case(2, None, 37, 45, (5, 9), 20, torch.bfloat16, **MODES[mode])
    exact = reference.correspondence_loss(q.detach().double(), k.detach().double(), pos, **kwargs)
    for impl in ("reference", "cpp"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = correspondence_loss(q, k, pos, impl=impl, **kwargs)
        assert_loss_close(loss, exact, q, k)
    assert loss.item() == correspondence_loss(q, k, pos, impl="cpp", **kwargs).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scored_in_float32 = correspondence_loss(q, k, pos, impl="reference", **kwargs)
    assert scored_in_float32.item() == pytest.approx(exact.item(), rel=1e-5)


@pytest.mark.parametrize("mode", list(MODES))
def test_inference_mode_with_several_threads(mode):
    # OpenMP's worker threads do not inherit inference mode; the kernels write into tensors the
    # caller allocated (inference tensors) from them.
    q, k, pos, kwargs = make_case(3, None, 129, 300, (15, 20), 16, torch.float32, **MODES[mode])
    exact = reference.correspondence_loss(q.detach().double(), k.detach().double(), pos, **kwargs)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with torch.inference_mode():
            loss = correspondence_loss(q.detach(), k.detach(), pos, impl="cpp", **kwargs)
    finally:
        torch.set_num_threads(previous)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)


def test_meta_and_fake_tensors_propagate_shapes():
    # No values to range-check: shape propagation works as for scft_attention.
    q, k, pos, kwargs = _base()
    meta = [t.to("meta") for t in (q, k, pos, kwargs["neg"])]
    assert correspondence_loss(*meta[:3], neg=meta[3], impl="reference").shape == ()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (q, k, pos)]
        assert correspondence_loss(*fake, mode="nll", impl="cpp").shape == ()


def test_head_axis_index_shapes_are_checked():
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4)
    with pytest.raises(ValueError, match=r"pos: leading dims \(B, \[H,\] N\) must be \(2, 3, 5\) or \(2, 5\)"):
        correspondence_loss(q, k, torch.zeros(3, 5, dtype=torch.int64), mode="nll", impl="cpp")
    with pytest.raises(ValueError, match="neg: leading dims"):
        correspondence_loss(q, k, torch.zeros(2, 5, dtype=torch.int64), neg=torch.zeros(2, 2, 5, 1, dtype=torch.int64))


CPP_BAD_INPUTS = [
    ("corr_nll_loss: q must have shape \\(B, N, D\\)", lambda ops, q, k, p, n: ops.corr_nll_loss(q[0], k, p, 0.5, False)),
    ("corr_nll_loss: k must have shape \\(B, M, D\\)", lambda ops, q, k, p, n: ops.corr_nll_loss(q, k[0], p, 0.5, False)),
    ("corr_nll_loss: k has dtype", lambda ops, q, k, p, n: ops.corr_nll_loss(q, k.double(), p, 0.5, False)),
    ("q must be a floating-point tensor", lambda ops, q, k, p, n: ops.corr_nll_loss(q.long(), k.long(), p, 0.5, False)),
    ("k's batch size B", lambda ops, q, k, p, n: ops.corr_nll_loss(q, k[:1], p, 0.5, False)),
    ("k's head dim D", lambda ops, q, k, p, n: ops.corr_nll_loss(q, k[..., :2], p, 0.5, False)),
    ("q's head dim D must be at least 1", lambda ops, q, k, p, n: ops.corr_nll_loss(q[..., :0], k[..., :0], p, 0.5, False)),
    ("at least one key", lambda ops, q, k, p, n: ops.corr_nll_loss(q, k[:, :0], p, 0.5, False)),
    ("scale must be finite", lambda ops, q, k, p, n: ops.corr_nll_loss(q, k, p, math.inf, False)),
    ("pos must have dtype int64", lambda ops, q, k, p, n: ops.corr_nll_loss(q, k, p.int(), 0.5, False)),
    ("pos must have shape", lambda ops, q, k, p, n: ops.corr_nll_loss(q, k, p[:, :2], 0.5, False)),
    ("pos values must be in \\[-1, M\\)", lambda ops, q, k, p, n: ops.corr_nll_loss(q, k, p.clone().fill_(6), 0.5, False)),
    ("corr_triplet_fwd: neg must have shape \\(B, N, T\\)", lambda ops, q, k, p, n: ops.corr_triplet_fwd(q, k, p, n[..., 0], 0.5, 1.0)),
    ("neg values must be in \\[-1, M\\)", lambda ops, q, k, p, n: ops.corr_triplet_fwd(q, k, p, n.clone().fill_(-3), 0.5, 1.0)),
    ("neg must have shape", lambda ops, q, k, p, n: ops.corr_triplet_fwd(q, k, p, n[:, :2], 0.5, 1.0)),
    ("margin must be finite", lambda ops, q, k, p, n: ops.corr_triplet_fwd(q, k, p, n, 0.5, math.nan)),
    ("key_grid \\(h, w\\) must be positive with h \\* w == M", lambda ops, q, k, p, n: ops.corr_hardest_fwd(q, k, p, 2, 2, 1, 0.5, 1.0)),
    ("key_grid \\(h, w\\) must be positive", lambda ops, q, k, p, n: ops.corr_hardest_fwd(q, k, p, -2, -3, 1, 0.5, 1.0)),
    ("exclusion must be >= 0", lambda ops, q, k, p, n: ops.corr_hardest_fwd(q, k, p, 2, 3, -1, 0.5, 1.0)),
    ("corr_hardest_fwd: margin must be finite", lambda ops, q, k, p, n: ops.corr_hardest_fwd(q, k, p, 2, 3, 1, 0.5, math.inf)),
]


@pytest.mark.parametrize("message,call", CPP_BAD_INPUTS, ids=[b[0] for b in CPP_BAD_INPUTS])
def test_cpp_entry_points_check_inputs(message, call):
    q, k, pos, kwargs = _base()
    with pytest.raises(RuntimeError, match=message):
        call(torch.ops.sketchcolor, q, k, pos, kwargs["neg"])


def test_cpp_backward_entry_points_check_saved_tensors():
    q, k, pos, kwargs = _base()
    neg, ops = kwargs["neg"], torch.ops.sketchcolor
    terms = ops.corr_triplet_fwd(q, k, pos, neg, 0.5, 1.0)
    with pytest.raises(RuntimeError, match="corr_triplet_bwd: terms must have shape"):
        ops.corr_triplet_bwd(terms, q, k, pos, neg, terms[..., :1], 0.5)
    with pytest.raises(RuntimeError, match="corr_triplet_bwd: grad_terms must have dtype Float, got Double"):
        ops.corr_triplet_bwd(terms.double(), q, k, pos, neg, terms, 0.5)
    with pytest.raises(RuntimeError, match="corr_triplet_bwd: neg values must be in"):
        ops.corr_triplet_bwd(terms, q, k, pos, neg.clone().fill_(9), terms, 0.5)
