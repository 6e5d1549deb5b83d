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
    # tanh through exp (tl has no tanh in every supported Triton, and libdevice.tanh does not
    # run under the interpreter): (1 - e) / (1 + e) with e = e^(-2|x|) = exp2(-2 log2(e) |x|),
    # which cannot overflow, the sign put back; below |x| = 0.1, where 1 - e cancels, the
    # series x (1 - x^2 / 3 + 2 x^4 / 15). +-inf give +-1, NaN stays NaN.
    a = tl.abs(x)
    e = tl.exp2(a * -2.8853900817779268)
    x2 = x * x
    t = tl.where(a < 0.1, a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0))), (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)
