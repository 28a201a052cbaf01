"""``sketchcolor bench`` on CPU with tiny sizes, the FLOP counts, the RESULTS.md sections and the
peak RSS of a function run in a child process."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from sketchcolor import cli
from sketchcolor.benchmarking import cases, command
from sketchcolor.benchmarking.memory import CPU_METHOD, PeakMemory
from sketchcolor.benchmarking.options import MAX_SEED
from sketchcolor.benchmarking.report import memory_notes, publish, result_record
from sketchcolor.benchmarking.results_file import write_section
from sketchcolor.benchmarking.suite import BenchResult, run_benchmarks
from sketchcolor.benchmarking.timing import Timing


def test_bench_writes_json_and_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out_dir = tmp_path / "bench"
    # Inputs of 256 KiB and more: above glibc's mmap threshold, so every case's peak RSS rises by
    # about its live tensors at least. torch_sdpa and cpp allocate little more than those, so
    # their rise can still fall just short of them (some reuse freed heap): then it is no
    # measurement, and is reported as such.
    argv = ["bench", "--op", "attention", "--impl", "cpp,triton", "--device", "cpu", "--sizes", "1024,1536", "--head-dim", "64", "--repeats", "2", "--threads", "1", "--out", str(out_dir)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "fwd+bwd GFLOP/s" in printed and "skipped attention triton: set TRITON_INTERPRET=1" in printed

    data = json.loads((out_dir / "bench.json").read_text())
    results = data["results"]
    assert {(r["provider"], r["n"]) for r in results} == {(p, n) for p in ("reference", "torch_sdpa", "cpp") for n in (1024, 1536)}
    for record in results:
        assert record["error"] is None
        assert record["fwd_median_ms"] > 0 and record["fwd_bwd_median_ms"] > 0 and len(record["fwd_bwd_samples_ms"]) == 2
        assert record["fwd_flops"] == 2 * record["n"] * record["m"] * (record["d"] + record["dv"])
        assert record["fwd_bwd_flops"] == pytest.approx(3.5 * record["fwd_flops"])
        assert record["fwd_flops_per_s"] == pytest.approx(record["fwd_flops"] / (record["fwd_median_ms"] * 1e-3))
        assert record["memory_method"] == "peak RSS of a child process"
        assert record["floor_bytes"] == 4 * record["n"] * 64 * 8  # q, k, v, out, the upstream gradient, dq, dk, dv
        if record["peak_bytes"] is None:
            assert record["peak_unmeasured_reason"].startswith("the peak RSS rose by")
            assert record["raw_peak_bytes"] - record["baseline_bytes"] < record["floor_bytes"]
        else:
            assert record["peak_bytes"] >= record["floor_bytes"] and record["raw_peak_bytes"] > record["peak_bytes"]
        baseline = next(r for r in results if r["provider"] == "torch_sdpa" and r["n"] == record["n"])
        assert record["time_vs_torch_sdpa"] == pytest.approx(record["fwd_bwd_median_ms"] / baseline["fwd_bwd_median_ms"])
        if record["peak_bytes"] is None or baseline["peak_bytes"] is None:
            assert record["memory_vs_torch_sdpa"] is None
        else:
            assert record["memory_vs_torch_sdpa"] == pytest.approx(record["peak_bytes"] / baseline["peak_bytes"])
    # The reference materializes N x M scores: far above its live tensors, always measured.
    assert all(r["peak_bytes"] > 16 * r["n"] ** 2 for r in results if r["provider"] == "reference")
    assert data["skipped"] == {"attention triton": "set TRITON_INTERPRET=1 to run Triton kernels on CPU"}
    assert data["environment"]["torch"] == torch.__version__ and data["environment"]["torch_threads"] == 1

    for name in ("time.png", "memory.png"):
        with Image.open(out_dir / name) as image:
            image.verify()
        with Image.open(out_dir / name) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200


def test_the_plots_name_the_cases_they_have_no_value_for(tmp_path):
    from sketchcolor.benchmarking.plots import plot_memory, plot_times

    def result(provider, n, peak, fwd_ms):
        memory = PeakMemory(CPU_METHOD, peak_bytes=peak, unmeasured_reason=None if peak else "below the floor")
        timings = {"fwd+bwd": Timing(3.0, (3.0,))} | ({"fwd": Timing(fwd_ms, (fwd_ms,))} if fwd_ms else {})
        return BenchResult(cases.Case("attention", provider, n, n, 8, 8), memory, timings)

    results = [result("cpp", 64, 2**20, 1.0), result("cpp", 128, None, None), result("reference", 64, 2**21, 1.0), result("reference", 128, 2**22, 1.0)]
    [panel] = plot_memory(results, tmp_path / "memory.png").axes
    assert [text.get_text() for text in panel.texts] == ["no value (see the table): cpp N=128"]
    assert [line.get_label() for line in panel.lines] == ["cpp", "reference"]
    [panel] = plot_times(results, tmp_path / "time.png").axes
    assert [text.get_text() for text in panel.texts] == ["no value (see the table): cpp fwd N=128"]
    # A pass no case ran (here fwd) is not a missing value.
    results = [dataclasses.replace(r, timings={"fwd+bwd": r.timings["fwd+bwd"]}) for r in results]
    [panel] = plot_times(results, tmp_path / "time.png").axes
    assert len(panel.texts) == 0 and [line.get_label() for line in panel.lines] == ["cpp fwd+bwd", "reference fwd+bwd"]


def test_cpu_peaks_below_the_live_tensors_are_not_reported_as_measured(tmp_path, capsys):
    # At small sizes a case can reuse heap the child already holds, and its peak RSS rises by less
    # than its own inputs and gradients, often by 0: that used to print as 0 MiB and 0x ratios.
    out_dir = tmp_path / "bench"
    argv = ["bench", "--device", "cpu", "--op", "correspondence", "--modes", "triplet", "--impl", "cpp", "--sizes", "64,256",
            "--head-dim", "8", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out_dir)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    records = json.loads((out_dir / "bench.json").read_text())["results"]
    unmeasured = [r for r in records if r["peak_bytes"] is None]
    assert unmeasured, "the sampled triplet's cpp kernel allocates too little to raise the peak RSS"
    for record in records:
        case = cases.Case.from_json({field.name: record[field.name] for field in dataclasses.fields(cases.Case)})
        assert record["floor_bytes"] == cases.live_tensor_bytes(case)
        if record["peak_bytes"] is None:
            assert "less than the" in record["peak_unmeasured_reason"] and record["memory_vs_reference"] is None
        else:
            assert record["peak_bytes"] >= record["floor_bytes"] and record["peak_unmeasured_reason"] is None
    table = printed.split("\n\n")[0].splitlines()[2:]
    peaks = [row.split()[8] for row in table]
    assert len(peaks) == len(records) and sum(peak.startswith(">=") for peak in peaks) == len(unmeasured)
    assert all(peak.startswith(">=") or float(peak) > 0 for peak in peaks)
    assert "0.00e+00" not in printed and "e+00x" not in printed
    assert "peak MiB >=X: not measured." in printed


def test_a_peak_below_the_floor_prints_as_a_bound_with_a_note(capsys):
    reference = _bench_result("reference")
    unmeasured = dataclasses.replace(
        _bench_result("cpp"),
        memory=PeakMemory(CPU_METHOD, None, 2 * 2**20, 2 * 2**20, floor_bytes=2**19, unmeasured_reason="the peak RSS rose by 0 bytes"),
    )
    options = dict(title="t", section="s", device="cpu", check_lines=[], legend="the legend", notes=[], results_path="unused.md")
    assert publish([reference, unmeasured], **options, write=False) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if " cpp " in line).split()
    assert row[8:11] == [">=0.5", "1.00x", "-"]  # peak MiB, time/ref, mem/ref
    assert printed.endswith("\nthe legend\n" + "\n".join(memory_notes([unmeasured])) + "\n")
    record = result_record(unmeasured, [reference, unmeasured])
    assert record["peak_bytes"] is None and record["floor_bytes"] == 2**19 and record["memory_vs_reference"] is None
    assert record["peak_unmeasured_reason"] == "the peak RSS rose by 0 bytes"


def test_live_tensor_bytes_are_those_of_the_tensors_of_a_forward_backward():
    grid = [cases.bench_case(v, p, 40, head_dim=12, dtype=dtype, negatives=5)
            for v in ("attention", "correspondence/triplet", "correspondence/hardest", "correspondence/nll")
            for p in ("reference", "cpp") for dtype in (torch.float32, torch.float64, torch.bfloat16)]
    grid.append(cases.Case("attention", "cpp", 7, 9, 5, dv=4, batch=2, heads=3))
    for case in grid:
        inputs, grad_output = cases.make_inputs(case), cases.output_gradient(case)
        outputs, grads = cases.forward_backward(case, inputs, grad_output)
        alive = [*inputs.values(), grad_output, *outputs, *grads]
        assert cases.live_tensor_bytes(case) == sum(t.nbytes for t in alive), case


def test_correspondence_modes_run_in_process():
    variants = [f"correspondence/{mode}" for mode in cases.CORRESPONDENCE_MODES]
    grid = [cases.bench_case(v, p, 36, head_dim=8, negatives=4) for v in variants for p in ("reference", "cpp")]
    results = run_benchmarks(grid, measure_memory=False, repeats=1, warmup=0, progress=False)
    for result in results:
        assert result.error is None and result.memory is None
        assert set(result.timings) == {"fwd", "fwd+bwd"}
    assert grid[2].key_grid == (6, 6)


def test_correspondence_flop_counts():
    nll = cases.bench_case("correspondence/nll", "cpp", 100, head_dim=10)
    hardest = cases.bench_case("correspondence/hardest", "cpp", 100, head_dim=10)
    triplet = cases.bench_case("correspondence/triplet", "cpp", 100, head_dim=10, negatives=7)
    assert cases.flops(nll, "fwd") == cases.flops(hardest, "fwd") == 2 * 100 * 100 * 10
    assert cases.flops(nll, "fwd+bwd") == 4 * cases.flops(nll, "fwd")
    assert cases.flops(hardest, "fwd+bwd") - cases.flops(hardest, "fwd") == 4 * 100 * 2 * 10
    assert cases.flops(triplet, "fwd") == 2 * 100 * 8 * 10 and cases.flops(triplet, "fwd+bwd") == 3 * cases.flops(triplet, "fwd")


def test_bench_rejects_bad_sizes_and_missing_cuda(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--sizes", "1024,abc"])
    assert "argument --sizes: expected a positive integer, got 'abc'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "out, message",
    [
        ("a_file", "--out '{tmp}/a_file' is a file; expected a folder"),
        ("a_file/bench", "--out '{tmp}/a_file/bench' cannot be created: '{tmp}/a_file' is a file"),
        ("taken", "--out '{tmp}/taken/bench.json' is a folder"),
    ],
)
def test_the_out_folder_is_checked_before_the_run(out, message, tmp_path, capsys, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("the benchmarks ran before --out was checked")

    monkeypatch.setattr(command, "run_benchmarks", no_run)
    (tmp_path / "a_file").write_text("")
    (tmp_path / "taken" / "bench.json").mkdir(parents=True)
    assert cli.main(["bench", "--device", "cpu", "--out", str(tmp_path / out)]) == 2
    assert f"sketchcolor bench: error: {message.format(tmp=tmp_path)}" in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_written_is_refused(tmp_path, capsys, monkeypatch):
    # Permission bits do not bind root, who runs CI, so the permission query itself refuses here.
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == read_only else access(path, mode))
    monkeypatch.setattr(command, "run_benchmarks", lambda *args, **kwargs: pytest.fail("ran before --out was checked"))
    assert cli.main(["bench", "--device", "cpu", "--out", str(read_only)]) == 2
    assert f"--out: the folder '{read_only}' is not writable" in capsys.readouterr().err


def test_the_seed_is_bounded(capsys):
    # The generators take 64-bit seeds, and the upstream gradient's is seed + 1.
    for seed in (str(2**64 - 1), str(MAX_SEED + 1)):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--seed", seed])
        assert f"argument --seed: expected an integer from 0 to {MAX_SEED} (2**63 - 2), got {seed}" in capsys.readouterr().err
    case = cases.bench_case("attention", "cpp", 8, head_dim=4)
    assert cases.output_gradient(case, MAX_SEED).shape == (1, 1, 8, 4)


def test_results_sections_are_replaced_in_place(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nwritten by hand\n")
    write_section(results, "script_a", "A v1")
    write_section(results, "script_b", "B v1")
    write_section(results, "script_a", "A v2\nsecond line")
    text = results.read_text()
    assert text.startswith("# Results\n\nwritten by hand\n")
    assert "A v1" not in text and text.count("<!-- BEGIN script_a -->") == 1
    assert text.index("A v2\nsecond line") < text.index("B v1")  # script_a kept its place


def _bench_result(provider: str, error: str | None = None, out_of_memory: bool = False) -> BenchResult:
    case = cases.bench_case("attention", provider, 64, head_dim=8)
    if error is not None:
        return BenchResult(case, PeakMemory(CPU_METHOD, error=error, out_of_memory=out_of_memory), error=error, out_of_memory=out_of_memory)
    return BenchResult(case, PeakMemory(CPU_METHOD, 2**20, 3 * 2**20, 2 * 2**20), {"fwd": Timing(1.0, (1.0,)), "fwd+bwd": Timing(3.0, (3.0,))})


def test_publish_prints_writes_the_section_and_returns_the_exit_status(tmp_path, capsys):
    results_path = tmp_path / "RESULTS.md"
    options = dict(title="Attention, cpu", section="bench_x cpu", device="cpu", check_lines=["PASS cpp float32 B1"],
                   legend="the legend", notes=["a note"], results_path=results_path)
    results = [_bench_result("reference"), _bench_result("cpp"), _bench_result("triton", "out of memory: 1 TiB", out_of_memory=True)]

    assert publish(results, **options, write=False) == 0
    printed = capsys.readouterr().out
    assert "fwd+bwd GFLOP/s" in printed and "time/ref" in printed and "time/sdpa" not in printed
    assert printed.endswith("\nthe legend\na note\n") and not results_path.exists()

    assert publish(results, **options, write=True) == 0
    assert capsys.readouterr().out.endswith(f"wrote the 'bench_x cpu' section of {results_path}\n")
    text = results_path.read_text()
    assert text.startswith("<!-- BEGIN bench_x cpu -->\n## Attention, cpu\n\n") and "Command: `" in text
    assert "Correctness first (sketchcolor.verify rule, float64 reference):\n- PASS cpp float32 B1\n" in text
    assert "| attention | cpp | float32 | 64 |" in text and text.endswith("the legend\n- a note\n<!-- END bench_x cpu -->\n")

    assert publish([*results, _bench_result("cuda", "RuntimeError: broken")], **options, write=False) == 1


def test_run_in_child_finds_a_function_of_the_running_script(tmp_path):
    script = tmp_path / "allocate.py"
    script.write_text(textwrap.dedent("""
        import json
        import time

        from sketchcolor.benchmarking.memory import run_in_child


        def allocate(mib):
            block = bytearray(mib * 2**20)
            block[::4096] = b"x" * len(block[::4096])  # touch every page so that it is resident
            return {"allocated": len(block)}


        def sleep():
            time.sleep(60)
            return {}


        if __name__ == "__main__":
            for mib in (0, 256):
                run = run_in_child(allocate, mib=mib)
                print(json.dumps({"returned": run.returned, "peak_rss_bytes": run.peak_rss_bytes, "error": run.error}))
            print(run_in_child(sleep, timeout=0.5).error)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    *runs, timeout_error = proc.stdout.strip().splitlines()
    without, with_block = (json.loads(run) for run in runs)
    assert without["error"] is None and with_block["error"] is None
    assert with_block["returned"] == {"allocated": 256 * 2**20}
    # Each child's peak is its own: the block shows in the second and was never in the first.
    assert with_block["peak_rss_bytes"] - without["peak_rss_bytes"] > 200 * 2**20
    assert timeout_error == "the measuring process ran past the 0.5 s timeout"


def _load_bench_script(name: str):
    """A script of benchmarks/ as a module (they are run as scripts, not installed)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "100", "--strides", "4"], "--sizes 100 with --strides 4: size must be a multiple of 16"),
        (["--sizes", "256", "--strides", "3"], "--sizes 256 with --strides 3: scft_stride must be one of (16, 8, 4)"),
        (["--attn", "fast"], "argument --attn: invalid choice: 'fast'"),
        (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
        *([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: no CUDA device is available on this machine")]),
    ],
)
def test_train_memory_bench_checks_its_cases_before_running_any(argv, message, capsys, monkeypatch):
    bench = _load_bench_script("bench_train_memory")
    monkeypatch.setattr(bench, "run_in_subprocess", lambda *args: pytest.fail("a case ran before the arguments were checked"))
    monkeypatch.setattr(sys, "argv", ["bench_train_memory.py", *argv, "--no-write"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_attention_cuda_goals_are_judged_from_the_run():
    bench = _load_bench_script("bench_attention")

    def result(provider, fwd_ms, fwd_bwd_ms, n=16384):
        case = cases.bench_case("attention", provider, n, dtype=torch.bfloat16, device="cuda")
        return BenchResult(case, None, {"fwd": Timing(fwd_ms, (fwd_ms,)), "fwd+bwd": Timing(fwd_bwd_ms, (fwd_bwd_ms,))})

    results = [result("torch_sdpa", 9.0, 30.0), result("triton", 4.0, 12.0), result("cuda", 2.0, 10.0),
               result("cuda", 0.1, 0.1, n=1024)]
    cuda_fwd_rate = cases.flops(results[2].case, "fwd") / 2e-3
    assert bench.cuda_goal_lines(results, cuda_fwd_rate / 0.5) == [
        "goal cuda N=16384 bf16 fwd+bwd <= 0.5x torch_sdpa: met (0.33x)",
        "goal cuda N=16384 bf16 fwd+bwd <= 1.0x triton: met (0.83x)",
        "goal cuda N=16384 bf16 fwd >= 0.6x the bf16 GEMM rate (1065 TFLOP/s, torch.matmul N x D x M): NOT met (0.50x)",
    ]
    without_triton = [r for r in results if r.case.provider != "triton"]
    assert bench.cuda_goal_lines(without_triton, None)[1:] == [
        "goal cuda N=16384 bf16 fwd+bwd <= 1.0x triton: not measured",
        "goal cuda N=16384 bf16 fwd >= 0.6x the bf16 GEMM rate: not measured",
    ]
