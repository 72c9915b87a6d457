"""Launch-side helpers shared by every Triton kernel module (``linear_cross_entropy``,
``sampled_softmax``, ``routing``, ``attention``): interpreter detection, device facts, tile
sizes, dot precision and accumulation dtypes. Plain Python (no ``@triton.jit`` code).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (Triton kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_tuned(device: torch.device) -> bool:
    """True when a launch compiles for a real GPU, i.e. the GPU tile/warp heuristics apply
    (the interpreter gets small tiles and no num_warps/num_stages instead)."""
    return device.type == "cuda" and not interpreting()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 4 off CUDA (the interpreter). Grid sizing uses
    it to split work across programs. 4 rather than 1 so that interpreter runs still split the
    catalog over several column programs (and the backward over several row programs, the
    atomic path) the way GPUs do: tests exercise the split/combine code without a GPU. Only
    the softmax launchers call it off CUDA; attention asks only on CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def pow2(n: int, lo: int = 1, hi: int = 0) -> int:
    """next_power_of_2(max(n, 1)) clamped to [lo, hi] (hi <= 0: no upper bound)."""
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(p, hi) if hi > 0 else p


def fp32_dot_precision() -> str:
    """``tl.dot`` input precision for fp32 operands, following torch's matmul setting:
    "tf32x3" (3xTF32 on tensor cores, fp32-level error) when
    ``torch.get_float32_matmul_precision()`` is "highest" (torch's default), "tf32" when the
    user chose "high"/"medium". Never "ieee": on sm_90 it lowers to FMA with operand and
    accumulator tiles in registers, which spill. The interpreter accepts "tf32x3" (its dot is a
    plain fp32 matmul whatever the precision), so there is no interpreter special case."""
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_flags(x: torch.Tensor):
    """(CAST_F32, PREC) for ``tl.dot`` on tiles of ``x``'s dtype: half tiles are cast to fp32
    under the interpreter (its bf16 dot is broken); fp32 operands follow torch's matmul
    precision (``fp32_dot_precision``), other dtypes take "tf32" (ignored by half-operand
    dots; it is what fp32 dots fed with cast half values, such as linear_cross_entropy's fp16
    backward dL/ds, run at)."""
    cast = interpreting() and x.dtype in (torch.float16, torch.bfloat16)
    return cast, (fp32_dot_precision() if x.dtype == torch.float32 else "tf32")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for every other float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    """``acc_dtype`` as the Triton type a kernel's ACC constexpr takes."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with stride 1 in its last dimension (copied only when it is not)."""
    return x if x.stride(-1) == 1 else x.contiguous()
