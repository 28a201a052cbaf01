"""``sketchcolor verify``: the quick sweep passes on CPU, a wrong gradient fails it, bad input is named."""
from __future__ import annotations

import json

import pytest
import torch

import sketchcolor.ops
from sketchcolor import cli, reference, verify
from sketchcolor.benchmarking.cases import Case, make_inputs


def test_quick_verify_passes_and_prints_the_table(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    report = tmp_path / "verify.json"
    # Two of the four dtypes keep the test short; the others run the same code.
    status = cli.main(["verify", "--quick", "--device", "cpu", "--dtype", "float64,bfloat16", "--json", str(report)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.splitlines()[0].split() == "op backend dtype shape worst max abs err max rel err allowed result note".split()
    data = json.loads(report.read_text())
    rows = data["rows"]
    assert data["summary"]["fail"] == 0 and data["summary"]["pass"] == sum(r["result"] == "PASS" for r in rows)
    ran = {(r["op"], r["dtype"]) for r in rows if r["backend"] == "cpp" and r["result"] == "PASS"}
    for op in ("attention", "correspondence/triplet", "correspondence/hardest", "correspondence/nll"):
        assert {(op, "float64"), (op, "bfloat16")} <= ran
    assert {r["op"] for r in rows if r["worst"] == "gradcheck" and r["result"] == "PASS"} >= {"attention", "correspondence/nll"}
    # Every check of a passing row passed, and the row shows the one nearest its allowance.
    for row in (r for r in rows if r["result"] == "PASS" and r["checks"]):
        assert all(check["passed"] for check in row["checks"])
        assert row["max_abs_error"] <= row["allowed"]
    skipped = {(r["op"], r["backend"]): r["note"] for r in rows if r["result"] == "SKIP"}
    assert skipped[("attention", "triton")] == "set TRITON_INTERPRET=1 to run Triton kernels on CPU"
    assert "--device cuda" in skipped[("attention", "cuda")]
    assert "set TRITON_INTERPRET=1" in out and "SKIP" in out


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward scales the gradient by 1.05: a backend with a wrong grad_k."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.05


def test_a_wrong_gradient_fails_with_the_row_marked(capsys, tmp_path, monkeypatch):
    correct = sketchcolor.ops.scft_attention

    def wrong_grad_k(q, k, v, scale=None, *, impl="auto", return_lse=False):
        if impl == "cpp":
            k = _ScaleGradient.apply(k)
        return correct(q, k, v, scale, impl=impl, return_lse=return_lse)

    monkeypatch.setattr(sketchcolor.ops, "scft_attention", wrong_grad_k)
    report = tmp_path / "verify.json"
    status = cli.main(["verify", "--quick", "--op", "attention", "--impl", "cpp", "--device", "cpu", "--dtype", "float64,bfloat16", "--json", str(report)])
    out = capsys.readouterr().out
    assert status == 1
    rows = [r for r in json.loads(report.read_text())["rows"] if r["backend"] == "cpp"]
    compared = [r for r in rows if r["worst"] != "gradcheck"]
    assert len(compared) == 4 and all(r["result"] == "FAIL" and r["worst"] == "grad_k" for r in compared)
    for row in compared:
        failed = {check["name"] for check in row["checks"] if not check["passed"]}
        assert failed == {"grad_k"}, row
        assert "grad_k" in row["note"]
    assert [r["result"] for r in rows if r["worst"] == "gradcheck"] == ["FAIL"]
    failing_lines = [line for line in out.splitlines() if "FAIL <<<" in line]
    assert len(failing_lines) == 5 and all("cpp" in line for line in failing_lines)
    assert "0 passed, 5 failed" in out


def test_a_backend_that_raises_fails_its_rows(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(sketchcolor.ops, "correspondence_loss", broken)
    status = cli.main(["verify", "--quick", "--op", "correspondence", "--impl", "cpp", "--device", "cpu", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert status == 1
    assert out.count("RuntimeError: kernel launch failed") == 6  # 3 modes x 2 shapes


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "float8"], "argument --dtype: unknown dtype 'float8'"),
        (["--impl", "cudnn"], "argument --impl: unknown backend 'cudnn'"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--op", "conv"], "argument --op: invalid choice: 'conv'"),
        (["--seed", "-1"], "argument --seed: expected an integer >= 0"),
    ],
)
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["verify", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _hinges(case: Case, inputs) -> torch.Tensor:
    scores = reference.attention_scores(inputs["q"].detach().double(), inputs["k"].detach().double())
    pos_scores = scores.gather(-1, inputs["pos"].clamp_min(0).unsqueeze(-1))
    hinge = scores.gather(-1, inputs["neg"].clamp_min(0)) - pos_scores + case.margin
    return hinge[(inputs["pos"] >= 0).unsqueeze(-1) & (inputs["neg"] >= 0)]


def test_terms_near_a_kink_are_left_out():
    # bfloat16 scores round by ~1e-2: with 4000 triplet terms some land that close to the hinge.
    case = Case("correspondence", "cpp", 500, 64, 32, mode="triplet", negatives=8, margin=1.0, dtype=torch.bfloat16)
    inputs = make_inputs(case, seed=3)
    cleared = verify.clear_of_kinks(case, inputs)
    assert (_hinges(case, inputs).abs() < 0.01).any(), "the inputs should have terms near the hinge"
    assert (_hinges(case, cleared).abs() >= 0.01).all()
    valid = inputs["neg"] >= 0
    removed = valid & (cleared["neg"] < 0)
    assert 0 < removed.sum() < 0.05 * valid.sum()  # only the few terms near the hinge go
    assert torch.equal(cleared["pos"], inputs["pos"])
