"""``sketchcolor verify``: every available backend against sketchcolor.reference.

For each op (attention, and the correspondence loss in each mode), backend, dtype and shape of
a sweep, the backend's outputs and gradients are compared with the reference run in float64
(the exact answer) by the rules of sketchcolor.testing, whose yardstick is the reference run
in the backend's own dtype. torch.autograd.gradcheck then checks each backend that accepts
float64 on a small shape. The result is one table; any FAIL makes the exit status 1, and a run
in which nothing could be checked (every case skipped) exits with 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch
from tqdm import tqdm

from . import reference
from .benchmarking import machine
from .benchmarking.cases import (
    CORRESPONDENCE_MODES,
    HARDEST_EXCLUSION,
    Case,
    differentiable_names,
    dtype_skip_reason,
    forward,
    forward_backward,
    make_inputs,
    output_gradient,
    skip_reason,
)
from .benchmarking.options import add_target_options, dtype_list, random_seed, selected_ops
from .benchmarking.report import format_table, write_json
from .output_paths import check_output_file
from .testing import compare_mean_loss, compare_to_reference, score_rounding_error

# (B, H or None, N, M, D, Dv). Quick covers odd N != M, a batch, heads, D = 992 and a D that is
# not a multiple of 16 (with Dv != D); full adds single rows and keys and several kernel tiles.
ATTENTION_SHAPES_QUICK = [(2, None, 33, 65, 100, 37), (1, 2, 17, 40, 992, 992)]
ATTENTION_SHAPES_FULL = ATTENTION_SHAPES_QUICK + [
    (1, None, 1, 7, 16, 16),
    (3, None, 97, 256, 64, 64),
    (1, 2, 256, 97, 100, 100),
    (3, 2, 7, 1025, 16, 48),
    (1, None, 1025, 97, 992, 992),
    (1, 1, 97, 1025, 992, 992),
]
# (B, H or None, N, M, D, T); the hardest mode lays M out on its most square grid (35 -> 5x7).
CORRESPONDENCE_SHAPES_QUICK = [(2, None, 33, 35, 100, 5), (1, 2, 17, 48, 992, 4)]
CORRESPONDENCE_SHAPES_FULL = CORRESPONDENCE_SHAPES_QUICK + [
    (1, None, 1, 7, 16, 3),
    (2, None, 129, 300, 64, 8),
    (2, 2, 97, 63, 20, 1),
    (1, None, 257, 1024, 992, 32),
]
GRADCHECK_ATTENTION_SHAPE = (2, 2, 5, 7, 6, 3)
GRADCHECK_CORRESPONDENCE_SHAPE = (2, None, 5, 12, 4, 3)
# With scores ~ N(0, 1), a margin of 1 leaves a good share of the triplet terms clipped at 0, so
# both sides of the hinge are checked (the paper's 12 would keep every term active).
VERIFY_MARGIN = 1.0
RESULTS = ("PASS", "FAIL", "SKIP")
NOTHING_TO_COMPARE = (
    "nothing to compare: every loss term of these inputs is left out (near a kink) or clipped at 0, so the exact "
    "loss and gradients are 0 (another --seed draws other inputs)"
)


@dataclasses.dataclass(frozen=True)
class Check:
    """One tensor (out, lse, loss, grad_<input>) against the float64 reference."""

    name: str
    max_abs_error: float
    max_rel_error: float  # max abs error / max |exact|
    allowed: float
    passed: bool
    problem: str | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """One case: its result, and the numbers of its worst check (largest error / allowed)."""

    op: str
    backend: str
    dtype: str = "-"
    shape: str = "-"
    worst: str = "-"  # the worst check's name; "gradcheck"; "run" when the backend raised
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    allowed: float | None = None
    result: str = "SKIP"
    note: str = ""
    checks: tuple[Check, ...] = ()


def attention_case(backend: str, shape, dtype: torch.dtype, device: str) -> Case:
    batch, heads, n, m, d, dv = shape
    return Case("attention", backend, n, m, d, dv=dv, batch=batch, heads=heads, dtype=dtype, device=device)


def correspondence_case(backend: str, mode: str, shape, dtype: torch.dtype, device: str) -> Case:
    batch, heads, n, m, d, negatives = shape
    return Case(
        "correspondence", backend, n, m, d, batch=batch, heads=heads, mode=mode,
        negatives=negatives if mode == "triplet" else None, margin=VERIFY_MARGIN, dtype=dtype, device=device,
    )


def plan(ops, backends, device: str, dtypes, quick: bool) -> tuple[list[Row], list[tuple[str, Case]]]:
    """SKIP rows for what cannot run here, and the ("compare" | "gradcheck", case) work items."""
    skips, work = [], []
    for op in ops:
        for backend in backends:
            reason = skip_reason(op, backend, device)
            if reason is not None:
                skips.append(Row(op, backend, note=reason))
                continue
            interpreted = backend == "triton" and torch.device(device).type == "cpu"
            short = quick or interpreted  # see INTERPRETER_NOTE
            for dtype in dtypes:
                dtype_reason = dtype_skip_reason(op, backend, dtype)
                if dtype_reason is not None:
                    skips.append(Row(op, backend, str(dtype).removeprefix("torch."), note=dtype_reason))
                    continue
                work += [("compare", case) for case in _sweep(op, backend, dtype, device, short)]
            if torch.float64 in dtypes:
                gradcheck_reason = dtype_skip_reason(op, backend, torch.float64)
                if gradcheck_reason is not None:
                    skips.append(Row(op, backend, "float64", worst="gradcheck", note=f"gradcheck needs float64; {gradcheck_reason}"))
                else:
                    work += [("gradcheck", case) for case in _gradcheck_cases(op, backend, device)]
    return skips, work


def _sweep(op: str, backend: str, dtype, device: str, quick: bool) -> list[Case]:
    if op == "attention":
        shapes = ATTENTION_SHAPES_QUICK if quick else ATTENTION_SHAPES_FULL
        return [attention_case(backend, shape, dtype, device) for shape in shapes]
    shapes = CORRESPONDENCE_SHAPES_QUICK if quick else CORRESPONDENCE_SHAPES_FULL
    return [correspondence_case(backend, mode, shape, dtype, device) for mode in CORRESPONDENCE_MODES for shape in shapes]


def _gradcheck_cases(op: str, backend: str, device: str) -> list[Case]:
    if op == "attention":
        return [attention_case(backend, GRADCHECK_ATTENTION_SHAPE, torch.float64, device)]
    return [correspondence_case(backend, mode, GRADCHECK_CORRESPONDENCE_SHAPE, torch.float64, device) for mode in CORRESPONDENCE_MODES]


def verify(ops, backends, device: str, dtypes, quick: bool, seed: int = 0, progress: bool = True) -> list[Row]:
    """The rows of the verification table: SKIPs first, then every check that ran."""
    skips, work = plan(ops, backends, device, dtypes, quick)
    rows = list(skips)
    for kind, case in tqdm(work, desc="verify", unit="case", file=sys.stderr, disable=not progress):
        rows.append(check_case(case, seed) if kind == "compare" else gradcheck_case(case, seed))
    return rows


def _inputs(case: Case, seed: int) -> dict[str, torch.Tensor]:
    inputs = make_inputs(case, seed)
    return clear_of_kinks(case, inputs) if case.op == "correspondence" else inputs


def upstream_gradient(case: Case, seed: int) -> torch.Tensor:
    """The gradient fed to backward: normal for attention's output; for the loss, the number of
    terms over the scale, which makes the gradient entries O(1) (those of the sum of the raw dot
    products), the size at which the rule's absolute slack is small next to them."""
    if case.op == "attention":
        return output_gradient(case, seed)
    terms = case.batch * (case.heads or 1) * case.n * (case.negatives or 1)
    loss_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    return torch.tensor(terms * math.sqrt(case.d), dtype=loss_dtype, device=case.device)


def check_case(case: Case, seed: int) -> Row:
    """Every output and gradient of ``case`` against the float64 reference."""
    with_lse = case.op == "attention"
    names = (["out", "lse"] if with_lse else ["loss"]) + [f"grad_{name}" for name in differentiable_names(case)]
    inputs = _inputs(case, seed)
    grad_output = upstream_gradient(case, seed)
    base = dict(op=case.variant, backend=case.provider, dtype=case.dtype_name, shape=case.shape_label())
    try:
        actual = _flat(forward_backward(case, inputs, grad_output, with_lse))
    except Exception as error:  # noqa: BLE001  (a backend that raises fails its row; the sweep goes on)
        return Row(**base, worst="run", result="FAIL", note=_first_line(error))
    ref_case = dataclasses.replace(case, provider="reference")
    exact_inputs = {name: t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t for name, t in inputs.items()}
    exact = _flat(forward_backward(ref_case, exact_inputs, grad_output.double(), with_lse))
    same = _flat(forward_backward(ref_case, inputs, grad_output, with_lse))
    checks = []
    for name, a, e, s in zip(names, actual, exact, same):
        comparison = compare_mean_loss(a, e, inputs["q"], inputs["k"]) if name == "loss" else compare_to_reference(a, e, s)
        checks.append(Check(name, comparison.max_abs_error, comparison.max_rel_error, comparison.allowed, comparison.passed, comparison.problem))
    worst = max(checks, key=lambda c: (not c.passed, c.max_abs_error / c.allowed if c.allowed else math.inf))
    failed = [c for c in checks if not c.passed]
    note = "; ".join(f"{c.name}: {c.problem}" if c.problem else f"{c.name}: {c.max_abs_error:.2e} > {c.allowed:.2e}" for c in failed)
    result = "FAIL" if failed else "PASS"
    if not failed and not any(e.any() for e in exact):
        # A backend that returns zeros where the exact answer is zero has shown nothing: not a PASS.
        result, note = "SKIP", NOTHING_TO_COMPARE
    return Row(
        **base, worst=worst.name, max_abs_error=worst.max_abs_error, max_rel_error=worst.max_rel_error,
        allowed=worst.allowed, result=result, note=note, checks=tuple(checks),
    )


def gradcheck_case(case: Case, seed: int) -> Row:
    """torch.autograd.gradcheck of the backend's first output in float64."""
    inputs = _inputs(case, seed)
    names = differentiable_names(case)

    def op(*tensors):
        return forward(case, {**inputs, **dict(zip(names, tensors))})[0]

    base = dict(op=case.variant, backend=case.provider, dtype=case.dtype_name, shape=case.shape_label(), worst="gradcheck")
    try:
        torch.autograd.gradcheck(op, [inputs[name] for name in names])
    except Exception as error:  # noqa: BLE001  (GradcheckError, or the backend raised: either fails the row)
        return Row(**base, result="FAIL", note=_first_line(error))
    return Row(**base, result="PASS")


def clear_of_kinks(case: Case, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` with the loss terms that sit within rounding distance of a kink left out.

    A triplet term near its hinge (S_neg - S_pos + margin ~ 0), or a hardest negative whose
    score nearly ties the runner-up's, may fall on either side in low precision, and then the
    backend and the reference rightly disagree by a whole term's gradient. Such negatives (or,
    for hardest, such queries) are set to -1, "none", which the loss leaves out. The clearance is
    four times the reference's score rounding error (two scores, twice the rule's yardstick),
    and at least 1e-3 so that gradcheck's finite differences stay on one side too.
    """
    if case.mode == "nll":
        return inputs
    q, k, pos = inputs["q"], inputs["k"], inputs["pos"]
    clearance = 4 * score_rounding_error(q, k) + 1e-3
    scores = reference.attention_scores(q.detach().double(), k.detach().double())  # (B, [H,] N, M)
    rows = scores.shape[:-1]
    full_pos = reference.broadcast_heads(pos, rows)
    pos_scores = scores.gather(-1, full_pos.clamp_min(0).unsqueeze(-1))  # (B, [H,] N, 1)
    if case.mode == "triplet":
        neg = inputs["neg"]
        full_neg = reference.broadcast_heads(neg, (*rows, neg.shape[-1]))
        hinge = scores.gather(-1, full_neg.clamp_min(0)) - pos_scores + case.margin
        return {**inputs, "neg": neg.masked_fill(_any_head(hinge.abs() < clearance, case), -1)}
    grid_width = case.key_grid[1]
    keys = torch.arange(case.m, device=scores.device)
    cell_distance = torch.maximum(
        (full_pos.unsqueeze(-1) // grid_width - keys // grid_width).abs(),
        (full_pos.unsqueeze(-1) % grid_width - keys % grid_width).abs(),
    )
    ranked = scores.masked_fill(cell_distance <= HARDEST_EXCLUSION, -math.inf).topk(min(2, case.m), dim=-1).values
    best = ranked[..., 0]
    runner_up = ranked[..., 1] if case.m > 1 else torch.full_like(best, -math.inf)
    # Rows without a candidate have best = -inf: their gap is nan and their hinge -inf, neither near.
    near = ((best - runner_up) < clearance) | ((best - pos_scores.squeeze(-1) + case.margin).abs() < clearance)
    return {**inputs, "pos": pos.masked_fill(_any_head(near, case), -1)}


def _any_head(mask: torch.Tensor, case: Case) -> torch.Tensor:
    """Index tensors are shared by the heads: a term near a kink in any head is left out of all."""
    return mask.any(dim=1) if case.heads is not None else mask


def _flat(outputs_and_grads) -> list[torch.Tensor]:
    outputs, grads = outputs_and_grads
    return [*outputs, *grads]


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0].rstrip(',:') if text else ''}"


# --- the table and the command -----------------------------------------------------------------


LEGEND = (
    "worst: the output or gradient nearest its allowance (every check is in --json). max rel err = max abs err / "
    "max |exact|. allowed: float64 1e-10 x max(1, max |exact|); other dtypes 2 x the error of the reference run in that dtype "
    "+ atol; the loss (a mean) 4 x the reference's score rounding error + atol."
)
INTERPRETER_NOTE = "triton on cpu runs in the Triton interpreter (NumPy, ~1000x slower): quick shapes only."
TABLE_HEADERS = ["op", "backend", "dtype", "shape", "worst", "max abs err", "max rel err", "allowed", "result", "note"]


def table_rows(rows: list[Row]) -> list[list[str]]:
    """Table cells of ``rows``; a failing row's result reads "FAIL <<<" so it stands out."""

    def number(value):
        return "-" if value is None else f"{value:.2e}"

    return [
        [r.op, r.backend, r.dtype, r.shape, r.worst, number(r.max_abs_error), number(r.max_rel_error), number(r.allowed),
         "FAIL <<<" if r.result == "FAIL" else r.result, r.note]
        for r in rows
    ]


def counts(rows: list[Row]) -> dict[str, int]:
    return {result.lower(): sum(r.result == result for r in rows) for result in RESULTS}


def add_verify(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check every available kernel backend against the reference (forward and gradients)",
        description="Run every available backend of the SCFT attention and correspondence-loss ops against "
        "sketchcolor.reference over a sweep of shapes: outputs and every gradient, float64 where the backend "
        "allows it and low precision by the 2x-reference rule, plus torch.autograd.gradcheck in float64. "
        "Prints one table; the exit status is 1 if any check fails, and 2 if nothing was verified (every case "
        "skipped). Backends that cannot run here are listed as skipped with the reason.",
    )
    add_target_options(parser)
    parser.add_argument(
        "--dtype",
        type=dtype_list,
        default=dtype_list("all"),
        metavar="LIST",
        help="comma-separated dtypes from float64, float32, bfloat16, float16, or all (default: all; "
        "gradcheck runs when float64 is included)",
    )
    parser.add_argument("--quick", action="store_true", help="two shapes per op instead of the full sweep")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the table to this JSON file")
    parser.add_argument("--seed", type=random_seed, default=0, help="seed of the random inputs (default: 0)")
    parser.set_defaults(handler=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file("--json", args.json)
    rows = verify(selected_ops(args.op), args.impl, args.device, args.dtype, args.quick, args.seed)
    print(format_table(TABLE_HEADERS, table_rows(rows)))
    print(f"\n{LEGEND}")
    if "triton" in args.impl and args.device == "cpu" and not args.quick and any(r.backend == "triton" and r.result != "SKIP" for r in rows):
        print(INTERPRETER_NOTE)
    tally = counts(rows)
    print(f"\n{tally['pass']} passed, {tally['fail']} failed, {tally['skip']} skipped on {args.device}")
    if args.json:
        write_json(args.json, {"environment": machine.describe(args.device), "summary": tally, "rows": [dataclasses.asdict(r) for r in rows]})
        print(f"wrote {args.json}")
    if tally["fail"]:
        return 1
    if not tally["pass"]:
        reasons = "; ".join(dict.fromkeys(f"{r.backend}: {r.note}" for r in rows))
        raise ValueError(f"nothing was verified on {args.device}: every case was skipped ({reasons})")
    return 0
