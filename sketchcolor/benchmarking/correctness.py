"""The correctness check that the scripts in benchmarks/ run before they time anything: each
fused backend against the float64 reference on small shapes, by sketchcolor.verify's rule.
A benchmark of a backend that computes the wrong answer would be a number about nothing."""
from __future__ import annotations

import sys
from collections.abc import Iterable

from ..verify import check_case
from .cases import Case


def run_check(labelled_cases: Iterable[tuple[str, Case]]) -> list[str]:
    """One line per (label, case), "<result> <label> <dtype> <shape>: <detail>"; the failures
    start with FAIL."""
    lines = []
    for label, case in labelled_cases:
        row = check_case(case, seed=0)
        detail = f"worst {row.worst}: max error {row.max_abs_error:.3g} <= allowed {row.allowed:.3g}" if row.result == "PASS" else row.note
        lines.append(f"{row.result} {label} {row.dtype} {row.shape}: {detail}")
    return lines


def print_check(lines: list[str], skip_check: bool) -> bool:
    """Print the check's ``lines``; whether to go on to timing: every case passed, or
    ``skip_check`` (the scripts' --skip-check) says to time anyway."""
    print("correctness against the float64 reference:\n" + "\n".join(f"  {line}" for line in lines))
    if any(line.startswith("FAIL") for line in lines) and not skip_check:
        print("a backend disagrees with the reference: nothing timed (--skip-check times anyway)", file=sys.stderr)
        return False
    return True
