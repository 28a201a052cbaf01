"""Proof of the CUDA kernels without a GPU: they compile for the real targets, fit them, and use
the tensor cores.

Every ``csrc/**/*.cu`` is compiled with nvcc, with setup.py's flags, for each of setup.py's
targets: sm_80, sm_90a, sm_100 and sm_120 (``-Xptxas -v``; two compiles at a time). Per kernel and
target:

* ptxas reports 0 bytes of spill stores and loads and a 0-byte stack frame (no register array
  went to local memory), and at most 255 registers;
* static shared memory (ptxas) plus the dynamic shared memory its launcher requests fits every
  device that runs the target's machine code (``DEVICE_SMEM``). The dynamic sizes come from each
  op header's table (``SMEM_TABLES``), printed by a tiny host program compiled from the headers; a
  kernel is matched to its configuration by the configuration's struct name, which is part of
  the kernel's mangled name, and every kernel names one. On devices granting 99 KiB (8.6, 8.9,
  12.x) the launchers take the compact configurations: those, and the configurations without a
  compact stand-in, fit 99 KiB; the full ones fit the largest grant of their target;
* the SASS (cuobjdump --dump-sass, from the CUDA toolkit or Triton's package) of every kernel
  that multiplies matrices contains tensor-core instructions (HMMA, or HGMMA for wgmma), and no
  kernel contains local-memory loads or stores (LDL / STL);
* the targets here are setup.py's own ``-gencode`` flags.

Also:
* a host program linked with the sm_80 objects checks that the launchers return
  cudaErrorInvalidValue for parameters the kernels cannot take (misaligned pointers, strides
  that are not multiples of 8 elements, zero or oversized dims, B*H > 65535, missing
  workspaces or outputs, a key grid that does not match M, key splits that do not cover the
  keys), before touching any device; that attention's backward workspace plan follows the rule
  restated in ``expected_plan`` (tests/test_cuda_attention.py relies on it); and that the
  hardest-negative search's key splits cover every key once;
* every torch binding csrc/<op>/<op>_cuda.cpp passes ``g++ -fsyntax-only`` against the
  installed torch headers (skipped where torch, its c10/cuda headers or g++ are missing).

Skips only where nvcc (or, for the SASS test, cuobjdump) cannot be found.
Run: PYTHONPATH=. pytest tests/test_cuda_compile.py -q  (about 40 s on 2 cores).
``python tests/test_cuda_compile.py`` prints the per-kernel report table of benchmarks/NOTES-cuda.md.
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
BINDINGS = sorted(glob.glob(os.path.join(CSRC, "*", "*_cuda.cpp")))
# Each op header's table of {configuration struct name, dynamic shared memory bytes}.
SMEM_TABLES = {
    "scft_attention/scft_attention.h": "sketchcolor::scft::kScftKernelSmemTable",
    "correspondence_loss/correspondence_loss.h": "sketchcolor::corr::kCorrKernelSmemTable",
}

ARCH_FLAGS = {
    "sm_80": "-gencode=arch=compute_80,code=sm_80",
    "sm_90a": "-gencode=arch=compute_90a,code=sm_90a",
    "sm_100": "-gencode=arch=compute_100,code=sm_100",
    "sm_120": "-gencode=arch=compute_120,code=sm_120",
}
# Shared memory per block (static + dynamic, the opt-in limit) of the devices that run each
# target's machine code: sm_80 runs on 8.0 and 8.7 (163 KiB) and on 8.6 and 8.9 (99 KiB); sm_90a
# on 9.0; sm_100 on 10.0 and 10.3 (227 KiB); sm_120 on 12.0 and 12.1 (99 KiB).
DEVICE_SMEM = {"sm_80": (163 * 1024, 99 * 1024), "sm_90a": (227 * 1024,), "sm_100": (227 * 1024,),
               "sm_120": (99 * 1024,)}
# setup.py's nvcc flags (the -gencode is per target here).
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DSKETCHCOLOR_WITH_CUDA=1"]
# Kernels that multiply matrices, by a substring of their mangled names.
MATRIX_KERNELS = ("scft_attn_fwd_kernel", "scft_attn_bwd_probs_kernel", "scft_gemm_kernel", "corr_hardest_search_kernel",
                  "scft_attn_fwd_sm90_kernel", "scft_gemm_sm90_kernel")
# Kernels written for sm_90a alone (wgmma): their configuration names contain this. The launchers
# select them only on compute capability 9.0, so on the other targets they must be empty stubs (a
# trap), and only their sm_90a build has to fit its target.
SM90_ONLY_CONFIG_TAG = "Sm90"
# Configurations for devices granting 99 KiB per block (8.6 and 8.9, which run the sm_80 machine
# code, and 12.x): their names contain this, and the name without it is the configuration they
# stand in for.
COMPACT_CONFIG_TAG = "Compact"
COMPACT_DEVICE_SMEM = 99 * 1024
MAX_REGISTERS = 255


def _find_tool(name: str, extra_dirs=()) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "bin", name))
    candidates.append(os.path.join("/usr/local/cuda/bin", name))
    candidates.extend(os.path.join(d, name) for d in extra_dirs)
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _triton_bin_dirs() -> list[str]:
    try:
        import triton  # noqa: F401  (only its package directory is used)
    except Exception:
        return []
    return [os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")]


NVCC = _find_tool("nvcc")
CUOBJDUMP = _find_tool("cuobjdump", _triton_bin_dirs())
NVDISASM = _find_tool("nvdisasm", _triton_bin_dirs())


def _cuda_include_dir() -> str | None:
    candidates = []
    if NVCC:
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "include"))
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "include"))
    candidates.append("/usr/local/cuda/include")
    for path in candidates:
        if os.path.isfile(os.path.join(path, "cuda_runtime.h")):
            return path
    return None


CUDA_INCLUDE = _cuda_include_dir()

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")

_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers(.*)")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict[str, dict]:
    """{mangled kernel name: {arch, registers, stack, spill_stores, spill_loads, static_smem}}."""
    kernels: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = _ENTRY_RE.search(line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "static_smem": 0}
            kernels[m.group(1)] = current
            continue
        if current is None:
            continue
        m = _FRAME_RE.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
            continue
        m = _USED_RE.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s = _SMEM_RE.search(m.group(2))
            current["static_smem"] = int(s.group(1)) if s else 0
    return kernels


def parse_sass(text: str) -> dict[str, dict[str, int]]:
    """{mangled kernel name: {opcode family: count}} for the families the tests look at."""
    counts: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = counts.setdefault(m.group(1), {"HMMA": 0, "HGMMA": 0, "LDSM": 0, "LDGSTS": 0, "LDL": 0, "STL": 0})
            continue
        if current is None:
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", line)
        if not m:
            continue
        op = m.group(1)
        if op in current:
            current[op] += 1
    return counts


def _compile(cu: str, arch: str, out_dir: str) -> dict:
    obj = os.path.join(out_dir, f"{os.path.basename(cu)}.{arch}.o")
    cmd = [NVCC, *NVCC_FLAGS, ARCH_FLAGS[arch], "-Xptxas", "-v", "-I", CSRC, "-c", cu, "-o", obj]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return {"cu": cu, "arch": arch, "obj": obj, "cmd": " ".join(cmd), "rc": proc.returncode,
            "log": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
    assert sources, "no .cu files under csrc/"
    out_dir = str(tmp_path_factory.mktemp("nvcc"))
    jobs = [(cu, arch) for cu in sources for arch in ARCH_FLAGS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _compile(job[0], job[1], out_dir), jobs))
    for r in results:
        r["kernels"] = parse_ptxas(r["log"])
    return results


def _smem_table_program() -> str:
    """A host program printing "<config name> <bytes>" for every entry of every SMEM_TABLES table."""
    includes = "".join(f'#include "{header}"\n' for header in SMEM_TABLES)
    loops = "".join(
        f"  for (const auto& e : {table}) std::printf(\"%s %zu\\n\", e.config_name, e.dynamic_smem_bytes);\n"
        for table in SMEM_TABLES.values()
    )
    return f"#include <cstdio>\n{includes}int main() {{\n{loops}  return 0;\n}}\n"


def read_smem_tables(out_dir: str) -> dict[str, int]:
    """{configuration struct name: dynamic shared memory bytes} from the headers' tables."""
    src = os.path.join(out_dir, "print_smem.cpp")
    with open(src, "w") as f:
        f.write(_smem_table_program())
    exe = os.path.join(out_dir, "print_smem")
    # nvcc hands a .cpp to the host compiler; the headers need only cuda_runtime_api.h.
    subprocess.run([NVCC, "-std=c++17", "-I", CSRC, src, "-o", exe], check=True, capture_output=True)
    table = {}
    for line in subprocess.run([exe], check=True, capture_output=True, text=True).stdout.splitlines():
        name, size = line.split()
        assert name not in table, f"configuration {name} appears in two tables"
        table[name] = int(size)
    return table


@pytest.fixture(scope="module")
def dynamic_smem(tmp_path_factory) -> dict[str, int]:
    if NVCC is None:
        pytest.skip("nvcc not found")
    table = read_smem_tables(str(tmp_path_factory.mktemp("smem")))
    assert table, "the kernel shared-memory tables are empty"
    return table


def _config_of(kernel: str, table: dict[str, int]) -> str | None:
    """The table configuration named in a mangled kernel name, or None if it names none."""
    # Itanium mangling writes an identifier as <length><name>, which delimits it exactly.
    matches = [name for name in table if f"{len(name)}{name}" in kernel]
    assert len(matches) <= 1, f"kernel {kernel} matches configurations {matches}"
    return matches[0] if matches else None


def test_targets_are_setup_pys():
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_flags = re.findall(r'"(-gencode=arch=\w+,code=\w+)"', f.read())
    assert setup_flags == list(ARCH_FLAGS.values())
    assert set(DEVICE_SMEM) == set(ARCH_FLAGS)


@needs_nvcc
def test_every_cu_compiles_for_every_target(builds):
    for r in builds:
        assert r["rc"] == 0, f"{r['cmd']} failed:\n{r['log'][-4000:]}"
        # ptxas says so when it has to serialize wgmma (an accumulator touched while in flight, ...).
        assert "Potential Performance Loss" not in r["log"], r["log"][-4000:]
        assert r["kernels"], f"ptxas reported no kernels for {r['cu']} ({r['arch']}):\n{r['log'][-2000:]}"
        for name, k in r["kernels"].items():
            assert k["arch"] == r["arch"], (name, k["arch"], r["arch"])


@needs_nvcc
def test_no_spills_no_stack_and_registers_fit(builds):
    for r in builds:
        for name, k in r["kernels"].items():
            assert "registers" in k and "spill_stores" in k, f"incomplete ptxas report for {name}: {k}"
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0, f"{r['arch']} {name} spills: {k}"
            assert k["stack"] == 0, f"{r['arch']} {name} uses a {k['stack']}-byte stack frame (local memory)"
            assert k["registers"] <= MAX_REGISTERS, f"{r['arch']} {name}: {k['registers']} registers"


def compact_device_configs(dynamic_smem: dict[str, int]) -> dict[str, int]:
    """The configurations a device granting little shared memory runs: the compact ones, and every
    other mma.sync configuration that has no compact stand-in."""
    replaced = {config.replace(COMPACT_CONFIG_TAG, "") for config in dynamic_smem if COMPACT_CONFIG_TAG in config}
    for config in replaced:
        assert config in dynamic_smem, f"{config} (with {COMPACT_CONFIG_TAG}) stands in for no configuration"
    return {config: size for config, size in dynamic_smem.items()
            if SM90_ONLY_CONFIG_TAG not in config and config not in replaced}


@needs_nvcc
def test_shared_memory_fits_each_target(builds, dynamic_smem):
    seen_configs = set()
    on_compact_devices = compact_device_configs(dynamic_smem)
    for r in builds:
        for name, k in r["kernels"].items():
            config = _config_of(name, dynamic_smem)
            assert config is not None, f"{name} names no configuration of the tables in {list(SMEM_TABLES)}"
            seen_configs.add(config)
            if SM90_ONLY_CONFIG_TAG in config and r["arch"] != "sm_90a":
                continue
            grants = DEVICE_SMEM[r["arch"]]
            if config in on_compact_devices:
                limit = min(grants)   # every device of the target may launch it
            elif max(grants) > COMPACT_DEVICE_SMEM:
                limit = max(grants)   # a full configuration: the devices granting more launch it
            else:
                continue              # no device of the target launches it (its stand-in runs)
            dynamic = dynamic_smem[config]
            total = k["static_smem"] + dynamic
            assert total <= limit, (
                f"{r['arch']} {name}: {k['static_smem']} B static + {dynamic} B dynamic = {total} B > {limit} B"
            )
    # Every configuration in the table belongs to a compiled kernel (the table is not stale).
    assert seen_configs == set(dynamic_smem), set(dynamic_smem) - seen_configs


@needs_nvcc
def test_python_knows_the_cuda_backends_shared_memory_need(dynamic_smem):
    # sketchcolor.ops._backends turns the cuda backend away on GPUs that grant less than the largest
    # kernel a small device runs (the launchers take a compact configuration where the device does
    # not grant the full one; the wgmma configurations run on 9.0 devices only, which grant 227 KiB).
    from sketchcolor.ops import _backends

    needs = compact_device_configs(dynamic_smem)
    assert _backends.CUDA_SMEM_PER_BLOCK == max(needs.values())
    assert max(needs.values()) <= COMPACT_DEVICE_SMEM, needs
    assert max(dynamic_smem.values()) <= max(DEVICE_SMEM["sm_90a"])


@needs_nvcc
@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found (CUDA toolkit or triton's package)")
def test_sass_uses_tensor_cores_and_no_local_memory(builds):
    seen = {arch: set() for arch in ARCH_FLAGS}   # MATRIX_KERNELS tags that name a compiled kernel
    for r in builds:
        assert r["rc"] == 0
        proc = subprocess.run([CUOBJDUMP, "--dump-sass", r["obj"]], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        sass = parse_sass(proc.stdout)
        assert set(sass) == set(r["kernels"]), (set(sass) ^ set(r["kernels"]))
        for name, counts in sass.items():
            assert counts["LDL"] == 0 and counts["STL"] == 0, f"{r['arch']} {name} touches local memory: {counts}"
            seen[r["arch"]].update(tag for tag in MATRIX_KERNELS if tag in name)
            if SM90_ONLY_CONFIG_TAG in name:
                # Every sm_90a-only kernel is on wgmma, so it multiplies matrices.
                assert any(tag in name for tag in MATRIX_KERNELS), f"{name} is missing from MATRIX_KERNELS"
                if r["arch"] == "sm_90a":
                    # wgmma reads its operands from shared memory itself: no ldmatrix.
                    assert counts["HGMMA"] > 0 and counts["HMMA"] == 0, f"{name} is not on wgmma: {counts}"
                    assert counts["LDGSTS"] > 0, f"{name} issues no cp.async copies"
                else:
                    assert counts["HGMMA"] + counts["HMMA"] + counts["LDGSTS"] == 0, f"{r['arch']} {name}: {counts}"
            elif any(tag in name for tag in MATRIX_KERNELS):
                assert counts["HMMA"] + counts["HGMMA"] > 0, f"{r['arch']} {name} has no tensor-core instruction"
                assert counts["LDSM"] > 0, f"{r['arch']} {name} loads no ldmatrix fragments"
                assert counts["LDGSTS"] > 0, f"{r['arch']} {name} issues no cp.async copies"
    for arch, tags in seen.items():
        assert tags == set(MATRIX_KERNELS), f"{arch}: no compiled kernel for {set(MATRIX_KERNELS) - tags}"


# A host program linked with the compiled kernels: the launchers validate their parameters before
# touching the device, so the rejections below run on any machine, GPU or not. Each line prints
# the cudaError_t the launcher returned; cudaErrorInvalidValue is 1.
_HOST_PROGRAM = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include "correspondence_loss/correspondence_loss.h"
#include "scft_attention/scft_attention.h"
using namespace sketchcolor::scft;
using sketchcolor::KernelDtype;
int main() {
  alignas(16) static unsigned char buf[1 << 16];
  float* fbuf = reinterpret_cast<float*>(buf);
  ScftAttnFwdParams f{};
  f.q = f.k = f.v = buf; f.out = buf; f.lse = fbuf;
  f.q_stride_b = f.k_stride_b = f.v_stride_b = 1024; f.q_stride_h = f.k_stride_h = f.v_stride_h = 512;
  f.q_stride_row = f.k_stride_row = f.v_stride_row = 16;
  f.batch = 2; f.heads = 2; f.n_queries = 7; f.n_keys = 5; f.head_dim = 16; f.value_dim = 16; f.scale = 0.25f;
  auto fwd = [&](const char* name, ScftAttnFwdParams x) {
    std::printf("%s %d\n", name, int(scft_attn_fwd_cuda(x, ScftDtype::kBFloat16, nullptr)));
  };
  { auto x = f; x.q = buf + 2; fwd("fwd_misaligned_q", x); }
  { auto x = f; x.k_stride_row = 12; fwd("fwd_row_stride_not_multiple_of_8", x); }
  { auto x = f; x.v_stride_h = 20; fwd("fwd_head_stride_not_multiple_of_8", x); }
  { auto x = f; x.head_dim = 0; fwd("fwd_zero_head_dim", x); }
  { auto x = f; x.value_dim = kMaxHeadDim + 1; fwd("fwd_value_dim_too_large", x); }
  { auto x = f; x.batch = 300; x.heads = 300; fwd("fwd_too_many_batch_heads", x); }
  { auto x = f; x.n_keys = 0; fwd("fwd_no_keys", x); }
  { auto x = f; x.n_keys = INT32_MAX / 2 + 1; fwd("fwd_too_many_keys", x); }
  { auto x = f; x.out = nullptr; fwd("fwd_null_out", x); }
  ScftAttnBwdParams b{};
  b.grad_out = b.q = b.k = b.v = b.out = buf; b.lse = fbuf; b.grad_q = b.grad_k = b.grad_v = buf;
  b.delta = fbuf; b.probs = b.dscores = buf; b.grad_q_accum = nullptr;
  b.grad_out_stride_b = b.q_stride_b = b.k_stride_b = b.v_stride_b = b.out_stride_b = 1024;
  b.grad_out_stride_h = b.q_stride_h = b.k_stride_h = b.v_stride_h = b.out_stride_h = 512;
  b.grad_out_stride_row = b.q_stride_row = b.k_stride_row = b.v_stride_row = b.out_stride_row = 16;
  b.batch = 1; b.heads = 1; b.n_queries = 7; b.n_keys = 300; b.head_dim = 16; b.value_dim = 16; b.scale = 0.25f;
  b.key_chunk = 384;
  auto bwd = [&](const char* name, ScftAttnBwdParams x) {
    std::printf("%s %d\n", name, int(scft_attn_bwd_cuda(x, ScftDtype::kFloat16, nullptr)));
  };
  { auto x = b; x.key_chunk = 100; bwd("bwd_chunk_not_multiple_of_128", x); }
  { auto x = b; x.key_chunk = 128; bwd("bwd_several_chunks_without_grad_q_accum", x); }
  { auto x = b; x.delta = nullptr; bwd("bwd_null_delta", x); }
  { auto x = b; x.out_stride_row = 10; bwd("bwd_out_row_stride_not_multiple_of_8", x); }
  sketchcolor::corr::CorrInputs in{};
  in.q = in.k = buf; in.pos = reinterpret_cast<const int64_t*>(buf);
  in.q_stride_b = in.k_stride_b = 1024; in.q_stride_row = in.k_stride_row = 16;
  in.batch = 2; in.n_queries = 7; in.n_keys = 300; in.head_dim = 16; in.scale = 0.25f;
  using namespace sketchcolor::corr;
  auto corr = [&](const char* name, cudaError_t err) { std::printf("%s %d\n", name, int(err)); };
  CorrTripletParams t{};
  t.in = in; t.neg = reinterpret_cast<const int64_t*>(buf); t.terms = fbuf; t.negatives = 4; t.margin = 12.f;
  { auto x = t; x.in.q = buf + 2; corr("triplet_misaligned_q", corr_triplet_fwd_cuda(x, KernelDtype::kBFloat16, nullptr)); }
  { auto x = t; x.in.k_stride_row = 20; corr("triplet_k_row_stride_not_multiple_of_8", corr_triplet_fwd_cuda(x, KernelDtype::kBFloat16, nullptr)); }
  { auto x = t; x.negatives = 0; corr("triplet_no_negatives", corr_triplet_fwd_cuda(x, KernelDtype::kBFloat16, nullptr)); }
  { auto x = t; x.in.head_dim = sketchcolor::corr::kMaxHeadDim + 1; corr("triplet_head_dim_too_large", corr_triplet_fwd_cuda(x, KernelDtype::kFloat16, nullptr)); }
  CorrHardestParams h{};
  h.in = in; h.terms = fbuf; h.neg = reinterpret_cast<int64_t*>(buf); h.split_best = fbuf;
  h.split_arg = reinterpret_cast<int*>(buf); h.grid_h = 15; h.grid_w = 20; h.exclusion = 1;
  h.key_splits = 3; h.keys_per_split = 128; h.margin = 12.f;
  { auto x = h; x.grid_w = 19; corr("hardest_grid_does_not_match_m", corr_hardest_fwd_cuda(x, KernelDtype::kBFloat16, nullptr)); }
  { auto x = h; x.key_splits = 2; corr("hardest_splits_miss_keys", corr_hardest_fwd_cuda(x, KernelDtype::kBFloat16, nullptr)); }
  { auto x = h; x.key_splits = 4; corr("hardest_empty_split", corr_hardest_fwd_cuda(x, KernelDtype::kBFloat16, nullptr)); }
  { auto x = h; x.keys_per_split = 100; x.key_splits = 3; corr("hardest_split_not_multiple_of_tile", corr_hardest_fwd_cuda(x, KernelDtype::kBFloat16, nullptr)); }
  { auto x = h; x.exclusion = -1; corr("hardest_negative_exclusion", corr_hardest_fwd_cuda(x, KernelDtype::kBFloat16, nullptr)); }
  { auto x = h; x.split_arg = nullptr; corr("hardest_null_workspace", corr_hardest_fwd_cuda(x, KernelDtype::kBFloat16, nullptr)); }
  CorrTripletGradQParams g{};
  g.in = in; g.neg = reinterpret_cast<const int64_t*>(buf); g.coef = fbuf; g.grad_q = buf + 4; g.negatives = 4;
  corr("grad_q_misaligned_output", corr_triplet_grad_q_cuda(g, KernelDtype::kBFloat16, nullptr));
  CorrRowScatterParams sc{};
  sc.src = buf; sc.src_stride_b = 1024; sc.src_stride_row = 16; sc.src_batches = 2; sc.src_rows = 7;
  sc.entry_row = reinterpret_cast<const int*>(buf); sc.entry_coef = fbuf;
  sc.offsets = reinterpret_cast<const int64_t*>(buf); sc.rows = 600; sc.head_dim = 16;
  { auto x = sc; corr("scatter_no_output", corr_row_scatter_cuda(x, KernelDtype::kBFloat16, nullptr)); }
  { auto x = sc; x.out = buf; x.out_f32 = fbuf; corr("scatter_two_outputs", corr_row_scatter_cuda(x, KernelDtype::kBFloat16, nullptr)); }
  { auto x = sc; x.out = buf; x.src_stride_row = 12; corr("scatter_src_row_stride_not_multiple_of_8", corr_row_scatter_cuda(x, KernelDtype::kBFloat16, nullptr)); }
  CorrNllRowsParams nr{};
  nr.in = in; nr.lse = fbuf; nr.terms = fbuf; nr.lse_masked = fbuf; nr.grad_q = fbuf;
  corr("nll_rows_grad_without_attn", corr_nll_rows_cuda(nr, KernelDtype::kBFloat16, nullptr));
  { auto x = f; x.out_f32 = fbuf; fwd("fwd_two_outputs", x); }
  // Valid parameters with an unknown instruction family (SKETCHCOLOR_CUDA_MMA) or copy ring
  // (SKETCHCOLOR_CUDA_STAGES): every launcher rejects them before the device is asked anything.
  for (const char* variable : {"SKETCHCOLOR_CUDA_MMA", "SKETCHCOLOR_CUDA_STAGES"}) {
    setenv(variable, "unknown", 1);
    const std::string name = variable;
    fwd((name + "_fwd").c_str(), f);
    bwd((name + "_bwd").c_str(), b);
    auto x = b; x.grad_v_f32 = fbuf;
    std::printf("%s_dv %d\n", variable, int(scft_attn_bwd_dv_cuda(x, ScftDtype::kFloat16, nullptr)));
    unsetenv(variable);
  }
  std::printf("dv_without_float32_output %d\n", int(scft_attn_bwd_dv_cuda(b, ScftDtype::kFloat16, nullptr)));
  const long long hardest_shapes[][4] = {{1, 16384, 16384, 132}, {16, 256, 256, 132}, {1, 7, 5, 108},
                                         {3, 1000, 1025, 132}, {1, 128, 300, 0}};
  for (const auto& s : hardest_shapes) {
    const CorrHardestPlan plan = corr_hardest_plan(s[0], s[1], s[2], int(s[3]));
    std::printf("hardest_plan %lld %lld %lld %lld %d %d\n", s[0], s[1], s[2], s[3], plan.key_splits,
                plan.keys_per_split);
  }
  const long long shapes[][5] = {{1, 16384, 16384, 992, 992}, {16, 256, 256, 992, 992},
                                 {16, 1024, 1100, 64, 48}, {33, 65536, 7, 1024, 8}, {1, 7, 1, 16, 16}};
  // No occupancy (memory alone), H100 wgmma, H100 mma.sync, A100 mma.sync, RTX 4090 (8.9: 100 KiB
  // per SM, one mma.sync GEMM CTA).
  const ScftGemmOccupancy occupancies[] = {{0, 0}, scft_gemm_occupancy(132, true, 233472, 1024),
                                           scft_gemm_occupancy(132, false, 233472, 1024),
                                           scft_gemm_occupancy(108, false, 167936, 1024),
                                           scft_gemm_occupancy(128, false, 102400, 1024)};
  const ScftBwdGemms kBwdGemms[] = {ScftBwdGemms::kAll, ScftBwdGemms::kValueOnly};
  for (const auto& s : shapes)
    for (const ScftGemmOccupancy& gemm : occupancies)
      for (const ScftBwdGemms gemms : kBwdGemms) {
        const ScftBwdWorkspacePlan plan = scft_bwd_workspace_plan(s[0], s[1], s[2], s[3], s[4], gemm, gemms);
        std::printf("plan %lld %lld %lld %lld %lld %d %d %d %d %d %d\n", s[0], s[1], s[2], s[3], s[4], gemm.slots,
                    gemm.block_n, int(gemms == ScftBwdGemms::kValueOnly), plan.key_chunk, plan.num_chunks,
                    int(plan.needs_grad_q_accum));
      }
  return 0;
}
"""


def expected_plan(batch_heads, n, m, d, dv, slots, block_n, value_only):
    """scft_bwd_workspace_plan, restated: the memory bound (tests/test_cuda_attention.py relies on
    it), then the multiple of 128 keys under it with the least modelled GEMM time."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    input_bytes = batch_heads * (n * (d + 2 * dv) + m * (d + dv)) * 2
    budget = max(64 << 20, input_bytes)
    chunk = max(128, budget // (batch_heads * n * 4) // 128 * 128)
    chunk = min(chunk, cdiv(m, 128) * 128)

    def chunk_cost(keys):
        kv_tiles_n = cdiv(dv, block_n) + (0 if value_only else cdiv(d, block_n))
        cost = cdiv(cdiv(keys, 128) * kv_tiles_n * batch_heads, slots) * n
        if not value_only:
            cost += cdiv(cdiv(n, 128) * cdiv(d, block_n) * batch_heads, slots) * keys
        return cost

    if slots > 0:
        costs = {c: (m // c) * chunk_cost(c) + (chunk_cost(m % c) if m % c else 0) for c in range(128, chunk + 1, 128)}
        chunk = min(costs, key=lambda c: (costs[c], -c))
    chunks = cdiv(m, chunk)
    return chunk, chunks, int(chunks > 1)


def expected_hardest_cover(n_keys, key_splits, keys_per_split, tile=128):
    """corr_hardest_plan's contract: whole key tiles per split, every key in exactly one split."""
    return keys_per_split % tile == 0 and keys_per_split >= tile and (key_splits - 1) * keys_per_split < n_keys <= key_splits * keys_per_split


@needs_nvcc
def test_launchers_reject_bad_parameters_on_the_host(builds, tmp_path):
    objs = [r["obj"] for r in builds if r["arch"] == "sm_80"]
    src = tmp_path / "launcher_checks.cpp"
    src.write_text(_HOST_PROGRAM)
    exe = tmp_path / "launcher_checks"
    proc = subprocess.run([NVCC, "-std=c++17", "-I", CSRC, str(src), *objs, "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    rejections = [line.split() for line in lines if not line.startswith(("plan", "hardest_plan"))]
    assert len(rejections) == 36
    for name, code in rejections:
        assert int(code) == 1, f"{name}: launcher returned cudaError {code}, expected cudaErrorInvalidValue (1)"
    plans = {tuple(map(int, line.split()[1:9])): tuple(map(int, line.split()[9:])) for line in lines
             if line.startswith("plan")}
    assert len(plans) == 5 * 5 * 2
    for args, plan in plans.items():
        assert plan == expected_plan(*args), (args, plan)
    # The paper's shape at N = M = 16384: memory allows 2432 keys per chunk; full GEMM waves take
    # 2048 on an H100 (132 SMs, either kernel) and 1664 on an A100 (108 SMs, two CTAs each).
    target = (1, 16384, 16384, 992, 992)
    assert plans[(*target, 0, 0, 0)][0] == 2432
    assert plans[(*target, 132, 256, 0)][0] == plans[(*target, 264, 128, 0)][0] == 2048
    assert plans[(*target, 216, 128, 0)][0] == 1664
    # On 8.6, 8.9 and 12.x one mma.sync GEMM CTA fits an SM's 100 KiB: 128 slots on an RTX 4090.
    assert (*target, 128, 128, 0) in plans and (*target, 256, 128, 0) not in plans
    hardest_plans = [list(map(int, line.split()[1:])) for line in lines if line.startswith("hardest_plan")]
    assert len(hardest_plans) == 5
    for batch, n, m, sms, splits, per_split in hardest_plans:
        assert expected_hardest_cover(m, splits, per_split), (batch, n, m, sms, splits, per_split)
        # Enough CTAs for about two per SM where the keys allow it.
        query_ctas = batch * -(-n // 128)
        assert splits == -(-m // 128) or query_ctas * splits >= 2 * max(sms, 1), (batch, n, m, sms, splits)


def _torch_include_dirs() -> list[str] | None:
    try:
        import torch.utils.cpp_extension as ext
    except Exception:
        return None
    dirs = ext.include_paths()
    return dirs if dirs and os.path.isdir(dirs[0]) else None


@needs_nvcc
@pytest.mark.parametrize("binding", BINDINGS, ids=os.path.basename)
def test_binding_passes_syntax_check(binding):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    includes = _torch_include_dirs()
    if includes is None:
        pytest.skip("torch headers not found")
    if not os.path.isfile(os.path.join(includes[0], "c10", "cuda", "CUDAGuard.h")):
        pytest.skip("this torch install has no c10/cuda headers")
    if CUDA_INCLUDE is None:
        pytest.skip("the CUDA toolkit's include directory (cuda_runtime.h) was not found")
    cmd = [
        gxx, "-std=c++17", "-fsyntax-only", "-Wall",
        # The CPU wheel ships c10/cuda headers but not the CMake-generated cuda_cmake_macros.h.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DSKETCHCOLOR_WITH_CUDA=1",
        "-I", CSRC, *[f"-I{d}" for d in includes], "-I", CUDA_INCLUDE,
        f"-I{sysconfig.get_paths()['include']}", binding,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 0 and not errors, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"


def _kernel_identifier(mangled: str) -> str:
    """The template name of a mangled kernel (the <length><identifier> followed by its template args)."""
    for m in re.finditer(r"\d+", mangled):
        # A hash in an anonymous namespace name can run into the length digits: try each suffix.
        for start in range(m.start(), m.end()):
            length = int(mangled[start : m.end()])
            ident = mangled[m.end() : m.end() + length]
            if len(ident) == length and ident.endswith("_kernel") and mangled[m.end() + length : m.end() + length + 1] == "I":
                return ident
    return mangled


def report(builds_result, table, sass_by_obj) -> str:
    """A markdown table of the ptxas and SASS numbers (used for benchmarks/NOTES-cuda.md)."""
    lines = ["| arch | kernel | config | regs | stack | spill st/ld | smem static+dyn (B) | HMMA | HGMMA | LDSM | LDGSTS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in builds_result:
        sass = sass_by_obj.get(r["obj"], {})
        for name, k in sorted(r["kernels"].items()):
            config = _config_of(name, table) or "-"
            kernel = _kernel_identifier(name)
            dtype = "bf16" if "bfloat16" in name else "fp16"
            variant = ""
            m = re.search(r"ScftGemm(?:Sm90)?ConfigELb([01])", name)
            if m:
                variant = " A[m][k]" if m.group(1) == "1" else " A[k][m]"
            m = re.search(r"ScftBwdProbs(?:Compact)?ConfigELb([01])", name)
            if m:
                variant = " P, dS" if m.group(1) == "1" else " P only"
            c = sass.get(name, {})
            lines.append(
                f"| {r['arch']} | {kernel}<{dtype}{variant}> | {config} | {k['registers']} | {k['stack']} | "
                f"{k['spill_stores']}/{k['spill_loads']} | {k['static_smem']}+{table[config]} | "
                f"{c.get('HMMA', '-')} | {c.get('HGMMA', '-')} | {c.get('LDSM', '-')} | {c.get('LDGSTS', '-')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    # Prints the report table: python tests/test_cuda_compile.py
    import tempfile

    if NVCC is None:
        sys.exit("nvcc not found")
    out = tempfile.mkdtemp()
    sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        res = list(pool.map(lambda job: _compile(*job, out), [(cu, a) for cu in sources for a in ARCH_FLAGS]))
    for r in res:
        if r["rc"] != 0:
            sys.exit(r["log"])
        r["kernels"] = parse_ptxas(r["log"])
    tbl = read_smem_tables(out)
    sass_all = {}
    if CUOBJDUMP:
        for r in res:
            sass_all[r["obj"]] = parse_sass(subprocess.run([CUOBJDUMP, "--dump-sass", r["obj"]], capture_output=True, text=True).stdout)
    print(report(res, tbl, sass_all))
