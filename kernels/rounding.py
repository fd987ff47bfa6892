"""Casting kernel results to 16-bit outputs the way the GPU does, also under the interpreter.

On a GPU, `x.to(tl.bfloat16)` rounds to nearest even (`cvt.rn.bf16.f32`). Triton's interpreter
(3.x) truncates instead, which doubles and biases the rounding error of every bf16 output and
would make the CPU tests judge a worse kernel than the one that runs. With `INTERPRETED` set,
the bits are rounded first so that the interpreter's truncation is exact; compiled kernels take
the plain cast. fp16 is rounded correctly by the interpreter (numpy) and needs nothing.
"""

import triton
import triton.language as tl


@triton.jit
def cast_rounded(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 `x` cast to `dtype`, rounding to nearest even (finite values)."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
