"""What is benchmarked and verified: the ops, their providers, inputs, FLOP counts and calls.

A case is one op variant (SCFT attention, or the correspondence loss in one mode) run by one
provider on one shape, dtype and device. ``sketchcolor bench``, ``sketchcolor verify`` and
the benchmarks/ suites all build their work from here, so they time and check the same calls.

Providers: the fused backends of sketchcolor.ops ("cpp", "triton", "cuda"), the materialized
"reference" (sketchcolor.reference) and, for attention, "torch_sdpa"
(torch.nn.functional.scaled_dot_product_attention), the baseline a user would otherwise call.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

from .. import ops, reference
from ..ops import _backends
from ..ops.correspondence_loss import FWD_OP as CORRESPONDENCE_FWD_OP
from ..ops.scft_attention import FWD_OP as ATTENTION_FWD_OP

OPS = ("attention", "correspondence")
CORRESPONDENCE_MODES = ("triplet", "hardest", "nll")
BACKENDS = ("cpp", "triton", "cuda")  # the fused backends; what --impl selects
OP_BACKENDS = {"attention": BACKENDS, "correspondence": BACKENDS}
BASELINES = {"attention": ("reference", "torch_sdpa"), "correspondence": ("reference",)}
PASSES = ("fwd", "fwd+bwd")

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Dtypes a backend accepts when it does not take all of DTYPES; its own input checks reject the
# others (kernels/scft_attention.py SUPPORTED_DTYPES; csrc/scft_attention/scft_attention_cuda.cpp).
_BACKEND_DTYPES = {
    ("attention", "triton"): (torch.float32, torch.bfloat16, torch.float16),
    ("attention", "cuda"): (torch.bfloat16, torch.float16),
    ("correspondence", "triton"): (torch.float32, torch.bfloat16, torch.float16),
    ("correspondence", "cuda"): (torch.bfloat16, torch.float16),
}

PAPER_HEAD_DIM = 992  # D = Dv of the paper's SCFT features
DEFAULT_NEGATIVES = 32  # sampled negatives per query, as LossConfig.num_negatives
DEFAULT_MARGIN = 12.0  # the paper's triplet margin
HARDEST_EXCLUSION = 1  # the hardest negative is more than this many grid cells from pos (the op's default)
INVALID_FRACTION = 0.1  # share of pos (and neg) entries that are -1, "no correspondence"
_FWD_OPS = {"attention": ATTENTION_FWD_OP, "correspondence": CORRESPONDENCE_FWD_OP}


@dataclasses.dataclass(frozen=True)
class Case:
    """One op variant, provider, shape, dtype and device.

    Attention: q (B, [H,] N, D), k (B, [H,] M, D), v (B, [H,] M, Dv).
    Correspondence: q, k as above, pos (B, N); ``negatives`` = T of neg (B, N, T) in mode
    "triplet"; mode "hardest" uses the key grid ``key_grid`` (the most square h x w = M).
    ``heads`` None means no head axis.
    """

    op: str
    provider: str
    n: int
    m: int
    d: int
    dv: int | None = None  # attention only
    batch: int = 1
    heads: int | None = None
    mode: str | None = None  # correspondence only
    negatives: int | None = None  # correspondence "triplet" only
    margin: float = DEFAULT_MARGIN
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if (self.op == "correspondence") != (self.mode is not None):
            raise ValueError(f"mode is required for the correspondence op and only for it, got op={self.op!r} mode={self.mode!r}")
        if self.mode is not None and self.mode not in CORRESPONDENCE_MODES:
            raise ValueError(f"mode must be one of {CORRESPONDENCE_MODES}, got {self.mode!r}")
        if (self.mode == "triplet") != (self.negatives is not None):
            raise ValueError("negatives (T) is required for mode 'triplet' and only for it")
        if (self.op == "attention") != (self.dv is not None):
            raise ValueError("dv is required for the attention op and only for it")

    @property
    def variant(self) -> str:
        """'attention' or 'correspondence/<mode>': what a table row or plot panel is about."""
        return self.op if self.mode is None else f"{self.op}/{self.mode}"

    @property
    def key_grid(self) -> tuple[int, int]:
        """(h, w) with h * w = M and h the largest divisor of M not above sqrt(M)."""
        h = max(f for f in range(1, math.isqrt(self.m) + 1) if self.m % f == 0)
        return h, self.m // h

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def shape_label(self) -> str:
        lead = f"B{self.batch}" + ("" if self.heads is None else f" H{self.heads}")
        if self.op == "attention":
            return f"{lead} N{self.n} M{self.m} D{self.d} Dv{self.dv}"
        h, w = self.key_grid
        negatives = f" T{self.negatives}" if self.negatives is not None else ""
        return f"{lead} N{self.n} M{self.m}({h}x{w}) D{self.d}{negatives}"

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "dtype": self.dtype_name}

    @classmethod
    def from_json(cls, data: dict) -> "Case":
        return cls(**{**data, "dtype": DTYPES[data["dtype"]]})


def bench_case(variant: str, provider: str, n: int, *, head_dim: int = PAPER_HEAD_DIM, dtype=torch.float32, device="cpu", negatives=DEFAULT_NEGATIVES) -> Case:
    """The benchmark shape: B = H = 1, N = M = n, D = Dv = head_dim."""
    if variant == "attention":
        return Case("attention", provider, n, n, head_dim, dv=head_dim, heads=1, dtype=dtype, device=device)
    op, _, mode = variant.partition("/")
    if op != "correspondence":
        raise ValueError(f"variant must be 'attention' or 'correspondence/<mode>', got {variant!r}")
    return Case(
        "correspondence", provider, n, n, head_dim, heads=1, mode=mode,
        negatives=negatives if mode == "triplet" else None, dtype=dtype, device=device,
    )


# --- which providers can run -------------------------------------------------------------------


def providers_for(op: str, backends: tuple[str, ...]) -> tuple[str, ...]:
    """The baselines of ``op`` followed by the requested fused backends that ``op`` has."""
    return BASELINES[op] + tuple(b for b in backends if b in OP_BACKENDS[op])


def skip_reason(op: str, provider: str, device: torch.device | str) -> str | None:
    """None if ``provider`` can run ``op`` on ``device`` here, else why not, in a user's words."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if provider in BASELINES[op]:
        return None
    if provider not in OP_BACKENDS[op]:
        return f"the {op} op has no {provider} backend"
    if provider == "cpp" and device.type != "cpu":
        return "the cpp backend runs on CPU tensors (use --device cpu)"
    if provider == "cuda" and device.type != "cuda":
        return "the cuda backend runs on CUDA tensors (use --device cuda)"
    if provider == "triton" and device.type == "cpu" and not _backends.triton_interpreting():
        return "set TRITON_INTERPRET=1 to run Triton kernels on CPU"
    return _backends.unavailable_reason(provider, device, _FWD_OPS[op])


def dtype_skip_reason(op: str, provider: str, dtype: torch.dtype) -> str | None:
    """None if ``provider`` accepts ``dtype`` for ``op``, else which dtypes it does accept."""
    accepted = _BACKEND_DTYPES.get((op, provider))
    if accepted is None or dtype in accepted:
        return None
    names = ", ".join(str(d).removeprefix("torch.") for d in accepted)
    return f"the {provider} kernels of {op} accept {names}"


# --- inputs ------------------------------------------------------------------------------------


def differentiable_names(case: Case) -> tuple[str, ...]:
    return ("q", "k", "v") if case.op == "attention" else ("q", "k")


def make_inputs(case: Case, seed: int = 0, requires_grad: bool = True) -> dict[str, torch.Tensor]:
    """Fresh seeded inputs of ``case`` on its device: normal features, and for the loss pos
    (B, N) and neg (B, N, T) with INVALID_FRACTION of their entries -1 and neg never = pos;
    every batch row keeps at least one term of the loss (in mode "hardest", one needs a key
    outside pos's exclusion window on the key grid, which every M but 1, 2 and 4 has)."""
    generator = torch.Generator().manual_seed(seed)
    lead = (case.batch,) if case.heads is None else (case.batch, case.heads)

    def features(rows: int, cols: int) -> torch.Tensor:
        t = torch.randn(*lead, rows, cols, generator=generator).to(device=case.device, dtype=case.dtype)
        return t.requires_grad_(requires_grad)

    def invalidate(index: torch.Tensor) -> torch.Tensor:
        return index.masked_fill(torch.rand(index.shape, generator=generator) < INVALID_FRACTION, -1)

    if case.op == "attention":
        return {"q": features(case.n, case.d), "k": features(case.m, case.d), "v": features(case.m, case.dv)}
    inputs = {"q": features(case.n, case.d), "k": features(case.m, case.d)}
    drawn_pos = torch.randint(case.m, (case.batch, case.n), generator=generator)
    if case.mode == "triplet":
        # Draw among the M - 1 other keys and step over pos, as the training loss samples them.
        draws = torch.randint(max(case.m - 1, 1), (case.batch, case.n, case.negatives), generator=generator)
        drawn_neg = draws + (draws >= drawn_pos.unsqueeze(-1)).long() if case.m > 1 else draws
        neg = invalidate(drawn_neg)
    pos = invalidate(drawn_pos)
    # A batch row without a term adds nothing to the loss and its gradients: with a single query
    # that is the whole case, and its check compares zeros. Such a row gets a term at its first
    # query: its drawn pos (and, for sampled negatives, its first drawn negative).
    first_pos = drawn_pos[:, 0]
    if case.mode == "triplet":
        has_term = ((pos >= 0).unsqueeze(-1) & (neg >= 0)).flatten(1).any(dim=1)
        neg[~has_term, 0, 0] = drawn_neg[~has_term, 0, 0]
        inputs["neg"] = neg.to(case.device)
    elif case.mode == "hardest":
        has_term = ((pos >= 0) & _has_hardest_candidate(pos, case.key_grid)).any(dim=1)
        # Key 0, a corner, has keys outside its window whenever any key has.
        first_pos = torch.where(_has_hardest_candidate(first_pos, case.key_grid), first_pos, 0)
    else:
        has_term = (pos >= 0).any(dim=1)
    pos[~has_term, 0] = first_pos[~has_term]
    inputs["pos"] = pos.to(case.device)
    return inputs


def _has_hardest_candidate(pos: torch.Tensor, key_grid: tuple[int, int]) -> torch.Tensor:
    """Per entry of ``pos`` (valid key indices): whether some key lies more than HARDEST_EXCLUSION
    cells (Chebyshev distance) from it on ``key_grid``, so that mode "hardest" has a negative.
    The farthest key from a cell is a corner of the grid."""
    height, width = key_grid
    row, col = pos // width, pos % width
    farthest = torch.maximum(torch.maximum(row, height - 1 - row), torch.maximum(col, width - 1 - col))
    return farthest > HARDEST_EXCLUSION


def output_gradient(case: Case, seed: int = 0) -> torch.Tensor:
    """The upstream gradient of a timed backward: normal for attention's output (B, [H,] N, Dv),
    1 for the loss (float32, float64 for float64 inputs, as the loss itself)."""
    if case.op != "attention":
        return torch.ones((), dtype=torch.float64 if case.dtype == torch.float64 else torch.float32, device=case.device)
    lead = (case.batch,) if case.heads is None else (case.batch, case.heads)
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randn(*lead, case.n, case.dv, generator=generator).to(device=case.device, dtype=case.dtype)


def live_tensor_bytes(case: Case) -> int:
    """Bytes of the tensors alive when forward_backward of make_inputs(case) returns: the inputs,
    the upstream gradient, the outputs and the gradients. A forward+backward needs at least this
    much memory at once, so a measured peak below it is below the measuring method's resolution."""
    rows = case.batch * (case.heads or 1)
    if case.op == "attention":
        inputs = rows * (case.n * case.d + case.m * case.d + case.m * case.dv)  # q, k, v
        output = rows * case.n * case.dv
        return case.dtype.itemsize * (2 * inputs + 2 * output)  # and their gradients
    features = rows * (case.n + case.m) * case.d  # q and k
    indices = case.batch * case.n * (1 + (case.negatives or 0))  # pos, and neg in mode "triplet"
    loss_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    # q, k and their gradients; pos (and neg); the scalar loss and its upstream gradient.
    return case.dtype.itemsize * 2 * features + torch.int64.itemsize * indices + loss_dtype.itemsize * 2


# --- calls -------------------------------------------------------------------------------------


def forward(case: Case, inputs: dict[str, torch.Tensor], with_lse: bool = False) -> tuple[torch.Tensor, ...]:
    """The op's outputs, the differentiable one first: (out[, lse]) or (loss,).

    ``with_lse`` asks attention for its log-sum-exp too (torch_sdpa has none to give).
    """
    if case.op == "attention":
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        if case.provider == "torch_sdpa":
            if with_lse:
                raise ValueError("torch_sdpa does not return the log-sum-exp")
            return (F.scaled_dot_product_attention(q, k, v),)
        if case.provider == "reference":
            result = reference.scft_attention(q, k, v, return_lse=with_lse)
        else:
            result = ops.scft_attention(q, k, v, impl=case.provider, return_lse=with_lse)
        return tuple(result) if with_lse else (result,)
    kwargs = dict(neg=inputs.get("neg"), mode="nll" if case.mode == "nll" else "triplet", margin=case.margin)
    if case.mode == "hardest":
        kwargs.update(hardest=True, key_grid=case.key_grid, exclusion=HARDEST_EXCLUSION)
    if case.provider == "reference":
        return (reference.correspondence_loss(inputs["q"], inputs["k"], inputs["pos"], **kwargs),)
    return (ops.correspondence_loss(inputs["q"], inputs["k"], inputs["pos"], impl=case.provider, **kwargs),)


def forward_backward(case: Case, inputs: dict[str, torch.Tensor], grad_output: torch.Tensor, with_lse: bool = False):
    """(outputs, gradients of the differentiable inputs) for upstream gradient ``grad_output``."""
    outputs = forward(case, inputs, with_lse)
    grads = torch.autograd.grad(outputs[0], [inputs[name] for name in differentiable_names(case)], grad_output)
    return outputs, grads


def workload(case: Case, inputs: dict[str, torch.Tensor], pass_: str, seed: int = 0) -> Callable[[], object]:
    """A call that runs one pass of ``case``: "fwd" (no autograd graph) or "fwd+bwd"."""
    if pass_ == "fwd":

        def run_forward():
            with torch.no_grad():
                return forward(case, inputs)

        return run_forward
    if pass_ != "fwd+bwd":
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    grad_output = output_gradient(case, seed)

    def run_forward_backward():
        return forward_backward(case, inputs, grad_output)

    return run_forward_backward


# --- FLOP counts -------------------------------------------------------------------------------


def flops(case: Case, pass_: str) -> float:
    """Useful floating-point operations of one pass (a multiply-add counts 2).

    attention  fwd 2*N*M*D (S = q k^T) + 2*N*M*Dv (P v); the backward recomputes S and runs
               dV, dP, dQ, dK: 2.5x the forward (the usual flash-attention count).
    nll        fwd 2*N*M*D (S); bwd recomputes S and runs dQ = dS K, dK = dS^T Q: 3x the forward.
    hardest    fwd 2*N*M*D (S for the streaming argmax); bwd is the sampled triplet backward
               with T = 1: 4*N*2*D (dq and dk over the positive and the chosen negative).
    triplet    fwd 2*N*(T+1)*D (the T negatives' and the positive's scores only);
               bwd 4*N*(T+1)*D (dq and dk over the same T + 1 keys).
    All times B (and H). Softmax, exp and max are not counted.
    """
    rows = case.batch * (case.heads or 1) * case.n
    if case.op == "attention":
        forward_flops = 2.0 * rows * case.m * (case.d + case.dv)
        backward_flops = 2.5 * forward_flops
    elif case.mode == "nll":
        forward_flops = 2.0 * rows * case.m * case.d
        backward_flops = 3 * forward_flops
    elif case.mode == "hardest":
        forward_flops = 2.0 * rows * case.m * case.d
        backward_flops = 4.0 * rows * 2 * case.d
    else:
        forward_flops = 2.0 * rows * (case.negatives + 1) * case.d
        backward_flops = 2 * forward_flops
    if pass_ == "fwd":
        return forward_flops
    if pass_ == "fwd+bwd":
        return forward_flops + backward_flops
    raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
