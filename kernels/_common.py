"""Constants and small ``@triton.jit`` helpers the kernel modules share."""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # scores are scaled by scale * log2(e) and exponentiated with exp2
LN2 = 0.6931471805599453  # base-2 log-sum-exp back to the natural log
# The same inside @triton.jit functions, which read only constexpr globals.
K_LOG2E = tl.constexpr(LOG2E)
K_LN2 = tl.constexpr(LN2)
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def round_half_even(r):
    # libdevice.rint does not run under the interpreter; this is exact for |r| < 2**23.
    f = tl.floor(r)
    d = r - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def tanh(x):
    # libdevice.tanh does not run under the interpreter: from exp2(-2|x|), which cannot
    # overflow; absolute error about 1e-7.
    e = tl.exp2(tl.abs(x) * -2.8853900817779268)  # e^(-2|x|): -2 log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)
