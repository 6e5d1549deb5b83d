"""frugal.merge_attention_states: attention over the union of two key sets from the attention
over each, against float64 attention over the union on fresh random inputs; empty parts (lse
-inf, their out poisoned with NaN: it must not be read), NaN and +inf propagation, extreme
magnitudes, non-contiguous inputs and the argument errors."""

import pytest
import torch

import frugal
from frugal.errors import DeviceError, DTypeError, ShapeError

NAN, INF = float("nan"), float("inf")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def attend64(q, k, v, scale):
    """float64 attention of q [R, D] over k, v [L, D] (L may be 0): (out [R, D], lse [R])."""
    s = (q.double() @ k.double().t()) * scale
    lse = torch.logsumexp(s, dim=-1) if k.shape[0] else torch.full(q.shape[:1], -INF,
                                                                    dtype=torch.float64)
    p = torch.exp(s - torch.where(lse == -INF, 0.0, lse)[:, None])
    return p @ v.double(), lse


def split_case(rows, d, len_a, len_b, gen, scale=0.3):
    """Queries [rows, D] and two disjoint key sets: the parts' float64 states and the union's."""
    q = torch.randn(rows, d, generator=gen)
    k = torch.randn(len_a + len_b, d, generator=gen) * 2
    v = torch.randn(len_a + len_b, d, generator=gen)
    a = attend64(q, k[:len_a], v[:len_a], scale)
    b = attend64(q, k[len_a:], v[len_a:], scale)
    return a, b, attend64(q, k, v, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("len_a,len_b", [(1, 1), (37, 5), (200, 3), (16, 129)])
def test_merge_matches_union(poison, dtype, len_a, len_b):
    gen = torch.Generator().manual_seed(len_a * 1000 + len_b)
    (oa, la), (ob, lb), (want, want_lse) = split_case(12, 40, len_a, len_b, gen)
    out, lse = frugal.merge_attention_states(oa.to(dtype).view(3, 4, 40), la.float().view(3, 4),
                                             ob.to(dtype).view(3, 4, 40), lb.float().view(3, 4))
    assert out.dtype == dtype and out.shape == (3, 4, 40)
    assert lse.dtype == torch.float32 and lse.shape == (3, 4)
    torch.testing.assert_close(out.double().view(12, 40), want, **TOL[dtype])
    torch.testing.assert_close(lse.double().view(12), want_lse, rtol=1e-6, atol=1e-5)
    # The merge is symmetric.
    out2, lse2 = frugal.merge_attention_states(ob.to(dtype), lb.float(), oa.to(dtype), la.float())
    torch.testing.assert_close(out2.double(), want, **TOL[dtype])
    torch.testing.assert_close(lse2, lse.view(12), rtol=1e-6, atol=1e-6)


def test_merge_is_exact_in_float32_for_float32_parts():
    # float32 parts in, the only errors are the float32 rounding of parts and merge.
    gen = torch.Generator().manual_seed(7)
    (oa, la), (ob, lb), (want, want_lse) = split_case(64, 128, 1000, 999, gen)
    out, lse = frugal.merge_attention_states(oa.float(), la.float(), ob.float(), lb.float())
    # A few float32 roundings (parts, weights, sum) of the parts' magnitudes.
    ulp = 2.0**-24
    assert ((out.double() - want).abs() <= 8 * ulp * (oa.abs() + ob.abs())).all()
    assert ((lse.double() - want_lse).abs() <= 8 * ulp * (want_lse.abs() + 1)).all()


def test_merge_chain_of_many_parts_equals_the_union():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(6, 32, generator=gen)
    k = torch.randn(300, 32, generator=gen)
    v = torch.randn(300, 32, generator=gen)
    cuts = [0, 1, 17, 18, 100, 101, 300]
    out, lse = attend64(q, k[:0], v[:0], 0.2)  # empty: out 0, lse -inf
    out, lse = out.float(), lse.float()
    for lo, hi in zip(cuts, cuts[1:]):
        o, s = attend64(q, k[lo:hi], v[lo:hi], 0.2)
        out, lse = frugal.merge_attention_states(out, lse, o.float(), s.float())
    want, want_lse = attend64(q, k, v, 0.2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-5)


def test_empty_parts_weigh_nothing_and_are_not_read():
    gen = torch.Generator().manual_seed(1)
    ob = torch.randn(5, 8, 16, generator=gen).half()
    lb = torch.randn(5, 8, generator=gen) * 50
    oa = torch.full_like(ob, NAN)  # an empty part's out must not be read
    la = torch.full_like(lb, -INF)
    la[0, 0], oa[0, 0] = 1.5, torch.randn(16, generator=gen).half()  # one row has both parts
    out, lse = frugal.merge_attention_states(oa, la, ob, lb)
    assert torch.equal(out[1:], ob[1:]) and torch.equal(lse[1:], lb[1:])  # bit for bit
    assert torch.equal(out[0, 1:], ob[0, 1:]) and torch.equal(lse[0, 1:], lb[0, 1:])
    assert torch.isfinite(out[0, 0]).all()
    out, lse = frugal.merge_attention_states(ob, lb, oa, la)  # either side
    assert torch.equal(out[1:], ob[1:]) and torch.equal(lse[1:], lb[1:])
    # Both empty: out 0, lse -inf.
    out, lse = frugal.merge_attention_states(oa[1:], la[1:], oa[1:].clone(), la[1:].clone())
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, -INF))


def test_nan_and_inf_propagate_to_their_rows_only():
    gen = torch.Generator().manual_seed(2)
    oa, ob = torch.randn(2, 4, 8, 16, generator=gen).unbind(0)
    la, lb = torch.randn(2, 4, 8, generator=gen).unbind(0)
    la[0, 1] = NAN          # a NaN lse: the row's out and lse are NaN
    lb[1, 2] = INF          # a +inf lse: NaN too (as the ops give for a +inf score)
    ob[2, 3, 5] = NAN       # a NaN in a non-empty part's out: that element only
    la[3, 4] = -INF         # empty a, NaN in its out: not read
    oa[3, 4] = NAN
    ob[3, 6, 0] = NAN
    lb[3, 6] = -200.0       # a part whose weight underflows still carries its NaN
    out, lse = frugal.merge_attention_states(oa, la, ob, lb)
    nan_rows = torch.zeros(4, 8, dtype=torch.bool)
    nan_rows[0, 1] = nan_rows[1, 2] = True
    assert torch.isnan(out[nan_rows]).all() and torch.isnan(lse[nan_rows]).all()
    assert torch.isnan(out[2, 3, 5]) and torch.isfinite(out[2, 3]).sum() == 15
    assert torch.isfinite(lse[2, 3])
    assert torch.equal(out[3, 4], ob[3, 4]) and torch.equal(lse[3, 4], lb[3, 4])
    assert torch.isnan(out[3, 6, 0]) and torch.isfinite(out[3, 6, 1:]).all()
    others = ~nan_rows
    others[2, 3] = others[3, 6] = False
    assert torch.isfinite(out[others]).all() and torch.isfinite(lse[others]).all()


def test_extreme_magnitudes_do_not_overflow():
    gen = torch.Generator().manual_seed(4)
    oa, ob = torch.randn(2, 3, 8, generator=gen).unbind(0)
    la = torch.tensor([1e4, -1e4, 3e38])
    lb = torch.tensor([1e4 + 1.0, -1e4 - 80.0, 3e38])
    out, lse = frugal.merge_attention_states(oa, la, ob, lb)
    wa = torch.sigmoid((la.double() - lb.double()))  # e^a / (e^a + e^b)
    want = wa[:, None] * oa.double() + (1 - wa[:, None]) * ob.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    want_lse = torch.logaddexp(la.double(), lb.double())
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=0)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(5)
    (oa, la), (ob, lb), (want, want_lse) = split_case(24, 32, 50, 7, gen)
    # out_b and lse_a as permuted views of other storage orders.
    x_a = oa.float().view(6, 4, 32)
    x_b = torch.empty(32, 6, 4).permute(1, 2, 0).copy_(ob.float().view(6, 4, 32))
    l_a = torch.empty(4, 6).t().copy_(la.float().view(6, 4))
    l_b = lb.float().view(6, 4)
    assert not x_b.is_contiguous() and not l_a.is_contiguous()
    out, lse = frugal.merge_attention_states(x_a, l_a, x_b, l_b)
    torch.testing.assert_close(out.double().reshape(24, 32), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double().reshape(24), want_lse, rtol=1e-6, atol=1e-5)


def test_errors_name_argument_expectation_and_value():
    o = torch.zeros(2, 3, 8)
    s = torch.zeros(2, 3)
    merge = frugal.merge_attention_states
    with pytest.raises(ShapeError, match=r"out_b must have out_a's shape \(2, 3, 8\); got "
                                         r"\(2, 3, 9\)"):
        merge(o, s, torch.zeros(2, 3, 9), s)
    with pytest.raises(ShapeError, match=r"lse_a must have shape \(2, 3\) .*; got \(2, 3, 1\)"):
        merge(o, s[..., None], o, s)
    with pytest.raises(ShapeError, match=r"lse_b must have shape \(2, 3\) .*; got \(3, 2\)"):
        merge(o, s, o, s.t())
    with pytest.raises(DTypeError, match="lse_b must be float32; got torch.float16"):
        merge(o, s, o, s.half())
    with pytest.raises(DTypeError, match="out_b must have out_a's dtype torch.float32; got "
                                         "torch.float16"):
        merge(o, s, o.half(), s)
    with pytest.raises(DTypeError, match="out_a must be float32, float16 or bfloat16; got "
                                         "torch.int32"):
        merge(o.int(), s, o, s)
    with pytest.raises(TypeError, match="lse_a must be a torch.Tensor; got list"):
        merge(o, [0.0], o, s)
    with pytest.raises(ShapeError, match="out_a must have at least 1 dim"):
        merge(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(DeviceError, match="lse_b must be on the same device as out_a"):
        merge(o, s, o, s.to("meta"))
    with pytest.raises(frugal.BackendError, match="backend='cpu' is not implemented"):
        merge(o, s, o, s, backend="cpu")


def test_explain_and_empty_shapes():
    o, s = torch.zeros(0, 4, 8), torch.zeros(0, 4)
    assert frugal.explain(frugal.merge_attention_states, o, s, o, s).backend == "torch"
    out, lse = frugal.merge_attention_states(o, s, o, s)
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)


# ------------------------------------------------------------------------ the C++ in-place merge


def cpp_merge():
    op = getattr(torch.ops.frugal, "merge_attention_states_", None)
    if op is None:
        pytest.skip("frugal._C is not built")
    return op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cpp_in_place_merge_with_rows_matches_the_union(poison, dtype):
    # The cascade decode's merge: rows[i] of (out, lse) merges with row i of the other state;
    # rows not named stay as they were. Odd sizes, a strided out_b, empty parts both ways.
    merge = cpp_merge()
    gen = torch.Generator().manual_seed(11)
    (oa, la), (ob, lb), (want, want_lse) = split_case(37, 24, 19, 45, gen)
    la, lb = la.float(), lb.float()
    la[3] = -INF          # empty a: out b's row, bit for bit
    lb[5] = -INF          # empty b: a's row unchanged
    la[7] = lb[7] = -INF  # both empty: 0, -inf
    rest = [i for i in torch.randperm(37, generator=gen).tolist() if i not in (3, 5, 7)]
    rows = torch.tensor([5] + rest[:13] + [3, 7] + rest[13:27])
    out = torch.randn(37, 24, generator=gen).to(dtype)
    out[rows] = oa[rows].to(dtype)
    out[rows[la[rows] == -INF]] = float("nan")  # an empty part's out must not be read
    lse = torch.randn(37, generator=gen)
    lse[rows] = la[rows]
    keep_out, keep_lse = out.clone(), lse.clone()
    wide = torch.full((30, 48), float("nan"), dtype=dtype)
    out_b = wide[:, ::2]  # strided rows and columns
    out_b.copy_(ob[rows].to(dtype))
    out_b[lb[rows] == -INF] = float("nan")  # not read either
    merge(out, lse, out_b, lb[rows].clone(), rows, None)
    others = torch.ones(37, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(out[others], keep_out[others]) and torch.equal(lse[others], keep_lse[others])
    full = ~((la == -INF) | (lb == -INF))
    sel = rows[full[rows]]
    torch.testing.assert_close(out[sel].double(), want[sel], **TOL[dtype])
    torch.testing.assert_close(lse[sel].double(), want_lse[sel], rtol=1e-6, atol=1e-5)
    assert torch.equal(out[3], ob[3].to(dtype)) and lse[3] == lb[3]
    assert torch.equal(out[5], keep_out[5]) and lse[5] == keep_lse[5]
    assert torch.equal(out[7], torch.zeros_like(out[7])) and lse[7] == -INF


def test_cpp_merge_agrees_with_the_public_op_including_nan_and_inf():
    merge = cpp_merge()
    gen = torch.Generator().manual_seed(12)
    oa, ob = torch.randn(2, 40, 16, generator=gen).unbind(0)
    la, lb = (torch.randn(2, 40, generator=gen) * 30).unbind(0)
    la[0], lb[1], la[2], lb[2] = NAN, INF, -INF, 1e30
    want, want_lse = frugal.merge_attention_states(oa, la, ob, lb)
    out, lse = oa.clone(), la.clone()
    merge(out, lse, ob, lb, None, None)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_cpp_merge_errors_name_the_argument():
    merge = cpp_merge()
    o, s = torch.zeros(4, 8), torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"rows\[1\] must be in \[0, 4\) \(rows of out\); "
                                           r"got 9"):
        merge(o, s, o[:2], s[:2], torch.tensor([0, 9]), None)
    with pytest.raises(RuntimeError, match="rows_b must be a 1-d int64 CPU tensor; got Int"):
        merge(o, s, o, s, None, torch.arange(4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"rows_b is None, so out_b must have at least 4 "
                                           r"rows; got 2"):
        merge(o, s, o[:2], s[:2], None, None)
    with pytest.raises(RuntimeError, match="out_b must have out's dtype Float; got Half"):
        merge(o, s, o.half(), s, None, None)
    with pytest.raises(RuntimeError, match="lse and lse_b must be float32"):
        merge(o, s, o, s.double(), None, None)
    assert torch.equal(o, torch.zeros(4, 8)) and torch.equal(s, torch.zeros(4))  # untouched
