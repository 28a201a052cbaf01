"""triton backend of correspondence_loss against sketchcolor.reference.

The numerics tests run on CUDA tensors when this process has a GPU, and on CPU tensors in
Triton's interpreter when TRITON_INTERPRET=1 was set before triton was imported. In a normal
run on a machine without a GPU, ``test_triton_kernels_under_the_interpreter`` reruns this file
in a subprocess with TRITON_INTERPRET=1 (small shapes, D = 992 included), and the kernels are
compiled ahead of time for every GPU generation of kernels/aot.py with every config the
autotuner may pick.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
ON_GPU = not INTERPRETING and torch.cuda.is_available()


def _score_tile_configs(name: str, dtype: torch.dtype) -> list:
    """The GPU configs the score-tile kernel ``name`` may run with for ``dtype`` inputs."""
    from sketchcolor.kernels import correspondence_loss as kernels

    return kernels.configs_for(kernels.SCORE_TILE_KINDS[getattr(kernels, name)], dtype.itemsize)


if not INTERPRETING:
    # The kernels whose score tiles are tensor-core dots, and the gather/scatter ones.
    DOT_KERNELS = ["corr_hardest_fwd", "corr_nll_fwd", "corr_nll_bwd_dq", "corr_nll_bwd_dk"]
    GATHER_KERNELS = ["corr_triplet_fwd", "corr_triplet_bwd_dq", "corr_segment_sum"]

    @pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these numerics run compiled, in this process")
    def test_triton_kernels_under_the_interpreter():
        pytest.importorskip("triton")
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env={**os.environ, "TRITON_INTERPRET": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"interpreted tests failed:\n{result.stdout[-8000:]}\n{result.stderr[-4000:]}"
        assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]

    # bf16 on every target of kernels/aot.py (sm_90 and sm_100 have their own asynchronous
    # tensor-core paths); float32 (IEEE dots, twice the shared memory) on sm_80 and on sm_86, which
    # has the least. Without triton there are no targets, and the test is skipped.
    TARGET_NAMES = list(importlib.import_module("sketchcolor.kernels.aot").GPU_TARGETS) if importlib.util.find_spec("triton") else []

    @pytest.mark.parametrize(
        "target_name,dtype",
        [(name, torch.bfloat16) for name in TARGET_NAMES] + [("sm_80", torch.float32), ("sm_86", torch.float32)],
        ids=str,
    )
    def test_kernels_compile_for_gpus(target_name, dtype):
        """Every kernel of one forward and backward of each mode, at the paper's D = 992, with every
        autotune config: PTX and a cubin, shared memory within the device's opt-in limit, and
        tensor-core dots in the kernels that multiply score tiles (bf16)."""
        pytest.importorskip("triton")
        from sketchcolor.kernels import aot
        from sketchcolor.kernels import correspondence_loss as kernels

        target, smem_limit = aot.GPU_TARGETS[target_name]
        launches = _record_launches(kernels, dtype)
        assert sorted({name for name, *_ in launches}) == sorted(DOT_KERNELS + GATHER_KERNELS)
        for name, fn, args, configs in launches:
            for config in configs:
                compiled = aot.compile_launch(aot.Launch(name, fn, args), config, target)
                where = f"{name} {config} on {target_name}"
                assert compiled.asm["cubin"], where
                assert compiled.metadata.shared <= smem_limit, f"{where}: {compiled.metadata.shared} bytes of shared memory"
                if name in DOT_KERNELS and dtype == torch.bfloat16:
                    assert aot.uses_tensor_cores(compiled.asm["ptx"], target), f"{where}: no tensor-core product in the PTX"

    def test_layouts_past_int32_offsets_are_copied():
        """The kernels multiply head-dim offsets by the stride in int32: q and k whose last-axis
        offsets reach 2**31 elements reach them as contiguous copies. Meta tensors: no memory."""
        pytest.importorskip("triton")
        from sketchcolor.kernels import aot
        from sketchcolor.kernels import correspondence_loss as kernels

        q = torch.empty_strided((1, 4, 3), (4, 1, 2**30), dtype=torch.bfloat16, device="meta")
        k = torch.empty_strided((1, 6, 3), (6, 1, 2**30), dtype=torch.bfloat16, device="meta")
        pos = torch.zeros((1, 4), dtype=torch.int64, device="meta")
        neg = torch.zeros((1, 4, 2), dtype=torch.int64, device="meta")
        recorder = aot.LaunchRecorder()
        kernels.triplet_forward(q, k, pos, neg, 0.5, 1.0, launch=recorder)
        kernels.hardest_forward(q, k, pos, 2, 3, 1, 0.5, 1.0, launch=recorder)
        kernels.nll_loss(q, k, pos, 0.5, True, launch=recorder)
        strides = {(launch.name, name): value for launch in recorder.launches for name, value in launch.args.items()
                   if name in ("stride_qd", "stride_kd")}
        assert strides and set(strides.values()) == {1}, strides

    def test_rows_past_the_grid_are_refused():
        """The nll backward puts query and key blocks on a grid axis capped at 65535 programs."""
        pytest.importorskip("triton")
        from sketchcolor.kernels import correspondence_loss as kernels

        rows = 65535 * 16 + 1
        q = torch.empty((1, rows, 8), dtype=torch.bfloat16, device="meta")
        k = torch.empty((1, 6, 8), dtype=torch.bfloat16, device="meta")
        pos = torch.zeros((1, rows), dtype=torch.int64, device="meta")
        with pytest.raises(ValueError, match=r"N and M must be at most 1048560 rows for the Triton kernels, got N=1048561, M=6"):
            kernels.nll_loss(q, k, pos, 0.5, True)

    def test_deterministic_mode_runs_each_kernel_with_a_fixed_config():
        """The autotuner picks by timing, which can differ between processes, and the tiles set
        the order of the fp32 sums: in deterministic mode (either switch) every score-tile kernel
        launches through a twin whose prune keeps one config, the first of the dtype's list."""
        pytest.importorskip("triton")
        from sketchcolor.kernels import aot
        from sketchcolor.kernels import correspondence_loss as kernels
        from sketchcolor.kernels import scft_attention

        def launched():
            handles = []

            def record(autotuned):
                handles.append(autotuned)
                return aot.LaunchRecorder()(autotuned)

            q, k = (torch.empty(1, 64, 32, dtype=torch.bfloat16, device="meta") for _ in range(2))
            pos = torch.empty(1, 64, dtype=torch.int64, device="meta")
            kernels.hardest_forward(q, k, pos, 8, 8, 1, 0.5, 1.0, launch=record)
            terms, lse = kernels.nll_forward(q, k, pos, 0.5, launch=record)
            kernels.nll_backward(terms, q, k, pos, lse, 0.5, launch=record)
            return handles

        timed = launched()
        assert timed == [getattr(kernels, name) for name in ("corr_hardest_fwd", "corr_nll_fwd", "corr_nll_bwd_dq", "corr_nll_bwd_dk")]
        pinned = [kernels.PINNED[handle] for handle in timed]
        with scft_attention.options(deterministic=True):
            assert launched() == pinned
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert launched() == pinned
        finally:
            torch.use_deterministic_algorithms(previous)
        for name, handle in zip(DOT_KERNELS, timed):
            for dtype in (torch.bfloat16, torch.float32):
                family = _score_tile_configs(name, dtype)
                args = {"Q": torch.empty(1, dtype=dtype, device="meta")}
                assert handle.early_config_prune(handle.configs, args) == family and len(family) > 1
                assert kernels.PINNED[handle].early_config_prune(handle.configs, args) == family[:1]

    def test_keys_past_the_segment_grid_are_refused():
        """The triplet backward's segment sum runs a program per key of the batch: B * M of them
        on a grid axis of at most 2^31 - 1."""
        pytest.importorskip("triton")
        from sketchcolor.kernels import correspondence_loss as kernels

        batch, m = 2049, 1048560
        q = torch.empty((batch, 4, 8), dtype=torch.bfloat16, device="meta")
        k = torch.empty((batch, m, 8), dtype=torch.bfloat16, device="meta")
        pos = torch.zeros((batch, 4), dtype=torch.int64, device="meta")
        neg = torch.zeros((batch, 4, 2), dtype=torch.int64, device="meta")
        terms = torch.zeros((batch, 4, 2), dtype=torch.float32, device="meta")
        with pytest.raises(ValueError, match=rf"B \* M = {batch * m} keys exceed the kernels' 2\^31 - 1 key segments"):
            kernels.triplet_backward(terms, q, k, pos, neg, terms, 0.5)

    def _record_launches(kernels, dtype, batch=2, n=4096, m=4096, d=992, negatives=32):
        """(name, jit function, arguments, the configs it may run with) of every launch, run on meta tensors."""
        names = {id(getattr(kernels, name)): name for name in DOT_KERNELS + GATHER_KERNELS}
        names.update({id(kernels.PINNED[getattr(kernels, name)]): name for name in DOT_KERNELS})
        launches = []

        def record(autotuned):
            class Grid:
                def __getitem__(self, grid):
                    def call(*args, **kwargs):
                        fn = autotuned.fn
                        name = names[id(autotuned)]
                        configs = _score_tile_configs(name, dtype) if name in DOT_KERNELS else autotuned.configs
                        launches.append((name, fn, {**dict(zip(fn.arg_names, args)), **kwargs}, configs))

                    return call

            return Grid()

        q = torch.empty(batch, n, d, dtype=dtype, device="meta")
        k = torch.empty(batch, m, d, dtype=dtype, device="meta")
        pos = torch.empty(batch, n, dtype=torch.int64, device="meta")
        neg = torch.empty(batch, n, negatives, dtype=torch.int64, device="meta")
        terms = kernels.triplet_forward(q, k, pos, neg, d**-0.5, 12.0, launch=record)
        kernels.triplet_backward(torch.empty_like(terms), q, k, pos, neg, terms, d**-0.5, launch=record)
        kernels.hardest_forward(q, k, pos, 64, 64, 1, d**-0.5, 12.0, launch=record)
        terms, lse = kernels.nll_forward(q, k, pos, d**-0.5, launch=record)
        kernels.nll_backward(terms, q, k, pos, lse, d**-0.5, launch=record)
        return launches

if INTERPRETING or ON_GPU:
    DEVICE = "cpu" if INTERPRETING else "cuda"
    from test_correspondence_loss import (
        MODES,
        check_all_invalid,
        check_cuda_graph_replay,
        check_deterministic,
        check_empty,
        check_hardest,
        check_hardest_ties,
        check_nan_reaches_the_loss,
        check_small_margin_and_strided_inputs,
        compare_with_reference,
        loss_and_grads,
        make_case,
    )

    from sketchcolor.ops import correspondence_loss

    # (B, H or None, N, M, key_grid, D): one query, several key tiles and query blocks with
    # tails, a head axis, and D = 992 (several D chunks and dq/dk slices, with tails).
    SHAPES = [
        (1, None, 1, 7, (1, 7), 16),
        (2, None, 37, 45, (5, 9), 20),
        (1, 2, 33, 63, (7, 9), 24),
        (1, None, 40, 70, (7, 10), 992),
    ]
    DTYPES = [torch.float32, torch.bfloat16]

    @pytest.mark.parametrize("mode", list(MODES))
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_triton_matches_reference(shape, dtype, mode):
        q, k, pos, kwargs = make_case(*shape, dtype, **MODES[mode], device=DEVICE)
        if mode == "hardest":
            check_hardest(q, k, pos, kwargs, impl="triton")
        else:
            compare_with_reference(q, k, pos, kwargs, impl="triton")

    # Every config of the kernels that multiply score tiles, with the mode that runs it. The
    # autotuner runs only the one it picks for the shapes at hand, so each runs pinned here: on a
    # GPU against a miscompile of one config, on the interpreter for each config's tiling.
    def _pinned_cases():
        from sketchcolor.kernels import correspondence_loss as kernels

        runs = {"corr_hardest_fwd": "hardest", "corr_nll_fwd": "nll", "corr_nll_bwd_dq": "nll", "corr_nll_bwd_dk": "nll"}
        return [
            (name, mode, dtype, index)
            for name, mode in runs.items()
            for dtype in DTYPES
            for index in range(len(_score_tile_configs(name, dtype)))
        ]

    @pytest.mark.parametrize("name, mode, dtype, index", _pinned_cases(), ids=str)
    def test_every_gpu_config_matches_reference(name, mode, dtype, index, monkeypatch):
        from sketchcolor.kernels import correspondence_loss as kernels

        autotuned = getattr(kernels, name)
        config = _score_tile_configs(name, dtype)[index]
        monkeypatch.setattr(autotuned, "configs", [config])
        monkeypatch.setattr(autotuned, "cache", {})
        # D = 992: several D chunks and slices; the interpreter's shape keeps tails in every block.
        shape = (1, None, 200, 130, (10, 13), 992) if ON_GPU else (1, None, 70, 66, (6, 11), 100)
        q, k, pos, kwargs = make_case(*shape, dtype, **MODES[mode], device=DEVICE)
        if mode == "hardest":
            check_hardest(q, k, pos, kwargs, impl="triton")
        else:
            compare_with_reference(q, k, pos, kwargs, impl="triton")
        assert autotuned.best_config is config  # the launch went through the pinned handle

    @pytest.mark.parametrize("mode", list(MODES))
    def test_triton_small_margin_and_non_contiguous(mode):
        check_small_margin_and_strided_inputs(mode, "triton", torch.float32, DEVICE)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_triton_hardest_ties_pick_the_lowest_index(dtype):
        check_hardest_ties(dtype, impl="triton", device=DEVICE)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_triton_nan_reaches_the_loss(dtype):
        check_nan_reaches_the_loss("triton", dtype, device=DEVICE)

    @pytest.mark.parametrize("mode", list(MODES))
    def test_triton_all_invalid_gives_zero_loss_and_zero_grads(mode):
        check_all_invalid(mode, "triton", device=DEVICE)

    @pytest.mark.parametrize("mode", list(MODES))
    def test_triton_empty_queries(mode):
        check_empty(mode, "triton", 2, 0, device=DEVICE)

    @pytest.mark.parametrize("mode", list(MODES))
    def test_triton_deterministic(mode):
        check_deterministic(*make_case(1, None, 40, 70, (7, 10), 32, torch.float32, **MODES[mode], device=DEVICE), impl="triton")

    if ON_GPU:   # CUDA graphs need a GPU; the interpreter runs on CPU tensors.
        @pytest.mark.parametrize("mode", list(MODES))
        def test_triton_graph_capture_replays(mode):
            check_cuda_graph_replay(mode, "triton", torch.float32)

    def test_triton_rejects_float64_with_a_reason():
        q, k, pos, kwargs = make_case(1, None, 5, 6, (2, 3), 4, torch.float64, **MODES["nll"], device=DEVICE)
        with pytest.raises(RuntimeError, match="impl='triton' takes float16, bfloat16 or float32 tensors, got float64"):
            correspondence_loss(q, k, pos, impl="triton", **kwargs)

    @pytest.mark.parametrize(
        "message, call",
        [
            (r"neg values must be in \[-1, M\) = \[-1, 6\), got values in \[100, 100\]",
             lambda ops, q, k, pos, neg: ops.corr_triplet_fwd_triton(q, k, pos, neg.fill_(100), 0.5, 1.0)),
            (r"pos values must be in \[-1, M\)", lambda ops, q, k, pos, neg: ops.corr_triplet_fwd_triton(q, k, pos.fill_(-7), neg, 0.5, 1.0)),
            ("margin must be finite", lambda ops, q, k, pos, neg: ops.corr_triplet_fwd_triton(q, k, pos, neg, 0.5, math.nan)),
            (r"neg values must be in \[-1, M\)", lambda ops, q, k, pos, neg: ops.corr_triplet_bwd_triton(
                torch.ones(1, 3, 2, device=q.device), q, k, pos, neg.fill_(6), torch.ones(1, 3, 2, device=q.device), 0.5)),
            ("scale must be finite", lambda ops, q, k, pos, neg: ops.corr_hardest_fwd_triton(q, k, pos, 2, 3, 1, math.inf, 1.0)),
            (r"pos values must be in \[-1, M\)", lambda ops, q, k, pos, neg: ops.corr_nll_loss_triton(q, k, pos.fill_(6), 0.5, False)),
        ],
        ids=["neg-range", "pos-range", "margin", "backward-neg-range", "scale", "nll-pos-range"],
    )
    def test_triton_ops_called_directly_check_their_inputs(message, call):
        # Past the public op's checks, an index outside [-1, M) would make the kernels read outside k.
        q, k = torch.randn(1, 3, 4, device=DEVICE), torch.randn(1, 6, 4, device=DEVICE)
        pos = torch.tensor([[0, 1, 2]], device=DEVICE)
        neg = torch.tensor([[[3, 4], [5, 3], [4, 5]]], device=DEVICE)
        with pytest.raises(ValueError, match=message):
            call(torch.ops.sketchcolor, q, k, pos, neg)

    def test_triton_opcheck_registered_ops():
        q, k, pos, kwargs = make_case(2, None, 9, 12, (3, 4), 8, torch.float32, **MODES["triplet_t4"], device=DEVICE)
        neg, ops = kwargs["neg"], torch.ops.sketchcolor
        terms = ops.corr_triplet_fwd_triton(q.detach(), k.detach(), pos, neg, 0.3, 2.0)
        cases = [
            (ops.corr_triplet_fwd_triton.default, (q, k, pos, neg, 0.3, 2.0)),
            (ops.corr_hardest_fwd_triton.default, (q, k, pos, 3, 4, 1, 0.3, 2.0)),
            (ops.corr_nll_loss_triton.default, (q, k, pos, 0.3, True)),
            (ops.corr_nll_loss_triton.default, (q.detach(), k.detach(), pos, 0.3, False)),
            (ops.corr_triplet_bwd_triton.default, (torch.randn_like(terms), q.detach(), k.detach(), pos, neg, terms, 0.3)),
        ]
        for op, args in cases:
            torch.library.opcheck(op, args)

    @pytest.mark.parametrize("mode", list(MODES))
    def test_triton_torch_compile(mode):
        q, k, pos, kwargs = make_case(2, None, 17, 20, (4, 5), 16, torch.float32, margin=2.0, **MODES[mode], device=DEVICE)

        def loss_fn(q, k):
            return correspondence_loss(q * 2.0, k, pos, impl="triton", **kwargs)

        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        got = loss_and_grads(compiled, q, k, 1.0)
        expected = loss_and_grads(loss_fn, q, k, 1.0)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)
