"""Regression tests of the fuzzing findings on the paged KV-cache: each bad input gets a clear
frugal error naming the argument (never an OverflowError, ZeroDivisionError or an all-NaN
result), and a refused call changes nothing."""

import pytest
import torch
from paged_cases import assert_unchanged, snapshot

import frugal
from frugal import PagedKVCache
from frugal.errors import DeviceError, ShapeError

BAD_SCALES = [float("nan"), float("inf"), -float("inf"), 1e300]


def _case():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(4, 16, 2, 32, generator=g)
    v = torch.randn(4, 16, 2, 32, generator=g)
    tables = torch.tensor([[2, 0]], dtype=torch.int32)
    lens = torch.tensor([20], dtype=torch.int32)
    return torch.randn(1, 4, 32, generator=g), k, v, tables, lens


@pytest.mark.parametrize("scale", BAD_SCALES)
def test_non_finite_or_huge_scales_are_refused_everywhere(scale):
    q, k, v, tables, lens = _case()
    with pytest.raises(ValueError, match="paged_attention: scale must be a finite number"):
        frugal.paged_attention(q, k, v, tables, lens, scale=scale)
    with pytest.raises(ValueError, match="paged_prefill_attention: scale must be a finite"):
        frugal.paged_prefill_attention(q[:, None], k, v, tables, lens, scale=scale)
    cache = PagedKVCache(1, 8, 4, 2, 32, dtype=torch.float32)
    cache.add_sequence(0)
    cache.append(0, [0], k[:1, :3], v[:1, :3])
    snap = snapshot(cache)
    with pytest.raises(ValueError, match="attention: scale must be a finite number"):
        cache.attention(q, 0, [0], scale=scale)
    with pytest.raises(ValueError, match="sparse_attention: scale must be a finite number"):
        x = torch.randn(1, 1, 8, 32)
        frugal.sparse_attention(x, x, x, frugal.masks.causal(8), scale=scale)
    assert_unchanged(cache, snap)


def test_token_ids_beyond_int64_are_refused_before_anything_changes():
    cache = PagedKVCache(1, 8, 4, 1, 16, dtype=torch.float32)
    cache.add_sequence(0)
    x = torch.randn(1, 4, 1, 16)
    snap = snapshot(cache)
    for ids in (torch.tensor([1, 2, 3, 2**63], dtype=torch.uint64), [1, 2, 3, 2**64],
                [1, 2, 3, -2**63 - 1]):
        with pytest.raises(ValueError, match=r"token_ids must be integers in \[-2\*\*63"):
            cache.append(0, [0], x, x, token_ids=ids)
        with pytest.raises(ValueError, match=r"token_ids must be integers in \[-2\*\*63"):
            cache.plan([0], 4, token_ids=ids)
        assert_unchanged(cache, snap)
    with pytest.raises(ValueError, match=r"token_ids must be integers in \[-2\*\*63"):
        cache.add_sequence(1, token_ids=[2**70])
    assert 1 not in cache
    # The largest ids that fit are fine (and hash).
    cache.append(0, [0], x, x, token_ids=torch.tensor([2**63 - 1, 0, 1, 2], dtype=torch.uint64))
    assert cache.seq_lens([0]).tolist() == [4]


def test_no_kv_heads_or_empty_head_dim_is_a_shape_error():
    q, k, v, tables, lens = _case()
    for shape in ((4, 16, 0, 32), (4, 16, 2, 0)):
        empty = torch.empty(shape)
        with pytest.raises(ShapeError, match="at least one kv head and head_dim >= 1"):
            frugal.paged_attention(q[..., :shape[3]], empty, empty, tables, lens)
        with pytest.raises(ShapeError, match="at least one kv head and head_dim >= 1"):
            frugal.paged_append(q[:, :0, :shape[3]], q[:, :0, :shape[3]], empty, empty,
                                torch.zeros(1, dtype=torch.int32))


def test_windows_beyond_any_length_mean_no_window():
    q, k, v, tables, lens = _case()
    want = frugal.paged_attention(q, k, v, tables, lens)
    for window in (2**31, 2**64, 10**30):
        torch.testing.assert_close(frugal.paged_attention(q, k, v, tables, lens, window=window),
                                   want, rtol=0, atol=0)
        torch.testing.assert_close(
            frugal.paged_prefill_attention(q[:, None], k, v, tables, lens, window=window),
            want[:, None], rtol=0, atol=0)


def test_meta_tables_cannot_be_validated():
    q, k, v, tables, lens = _case()
    meta = [t.to("meta") for t in (q, k, v, tables, lens)]
    with pytest.raises(DeviceError, match="meta device hold no entries to check"):
        frugal.paged_attention(*meta)
    with pytest.raises(DeviceError, match="block_tables must be on k_cache's device"):
        frugal.paged_attention(q, k, v, tables.to("meta"), lens)


def test_cpu_table_check_agrees_with_the_torch_check(monkeypatch):
    """The numpy test of CPU tables (the fast path) flags exactly the tables the torch check
    refuses: random tables, lengths, windows and q_lens, about half of them broken."""
    from frugal import paged_ops

    fast = paged_ops._cpu_tables_bad
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.empty(6, 16, 1, 16)
    seen = {True: 0, False: 0}
    for trial in range(400):
        B, width = (int(torch.randint(1, n, (1,), generator=gen)) for n in (4, 5))
        tables = torch.randint(-2, 8, (B, width), generator=gen, dtype=torch.int32)
        if trial % 2:
            tables = tables.clamp(-1, 5)
        lens = torch.randint(-1, width * 16 + 3, (B,), generator=gen, dtype=torch.int32)
        window = [None, 1, 7, 40][trial % 4]
        q_lens, rows = None, None
        if trial % 3 == 0:
            q_lens = torch.randint(-1, 20, (B,), generator=gen, dtype=torch.int32)
            rows = int(q_lens.clamp(min=0).sum()) + (trial % 5 == 0)
        if trial % 7 == 0:
            tables = tables.t().contiguous().t() if B == width else tables[:, ::1]
        bad = fast(tables, lens, 6, 16, window, q_lens, rows)
        monkeypatch.setattr(paged_ops, "_cpu_tables_bad", lambda *a: True)  # the torch check
        try:
            paged_ops._check_table_contents("op", tables, lens, k_cache, window, q_lens, rows)
            refused = False
        except (frugal.errors.FrugalError, ValueError):
            refused = True
        monkeypatch.setattr(paged_ops, "_cpu_tables_bad", fast)
        assert bad == refused, (tables, lens, window, q_lens, rows)
        seen[bad] += 1
    assert min(seen.values()) > 50, seen


def test_the_cpp_table_check_agrees_with_numpy_on_random_tables(monkeypatch):
    """paged_ops._cpu_tables_bad in C++ (csrc/cpu/paged_checks.cpp) and in numpy give the same
    verdict on random tables with a few bad entries, lengths and q_lens, strided tables
    included."""
    from frugal import paged_ops

    if paged_ops._C_TABLES_BAD is None:
        pytest.skip("frugal._C is not built")
    gen = torch.Generator().manual_seed(0)
    verdicts = set()
    for trial in range(400):
        rows, width, bs, nb = (int(x) for x in torch.randint(1, 6, (4,), generator=gen))
        bs *= 4
        table = torch.randint(-1, nb, (rows, width * 2), generator=gen, dtype=torch.int32)
        if trial % 3 == 0:
            table[torch.randint(0, rows, (1,), generator=gen), 0] = int(
                torch.randint(-3, nb + 3, (1,), generator=gen))
        table = table[:, ::2] if trial % 2 else table[:, :width]
        lens = torch.randint(-1, width * bs + 2, (rows,), generator=gen, dtype=torch.int32)
        window = None if trial % 4 else int(torch.randint(1, 3 * bs, (1,), generator=gen))
        q_lens = None
        q_rows = None
        if trial % 5 == 1:
            q_lens = (torch.rand(rows, generator=gen) * lens.clamp(min=0)).to(torch.int32)
            q_rows = int(q_lens.sum()) + (1 if trial % 10 == 1 else 0)
        monkeypatch.setattr(paged_ops, "_C_TABLES_BAD", None)
        want = bool(paged_ops._cpu_tables_bad(table, lens, nb, bs, window, q_lens, q_rows))
        monkeypatch.undo()
        got = paged_ops._cpu_tables_bad(table, lens, nb, bs, window, q_lens, q_rows)
        assert got is want, (trial, table, lens, window, q_lens, q_rows)
        verdicts.add(want)
    assert verdicts == {True, False}


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 (compared below)
        return type(exc).__name__, str(exc)


def _decode_mutations():
    """(name, args, kwargs) of paged_attention on CPU tensors: valid calls and one broken
    argument at a time."""
    q, k, v, tables, lens = _case()
    ks = torch.rand(4, 16, 2)
    k8, v8 = (k * 30).round().clamp(-127, 127).to(torch.int8), (v * 30).to(torch.int8)
    good = (q, k, v, tables, lens)
    out = [("valid", good, {}), ("window", good, dict(window=3)),
           ("int8", (q, k8, v8, tables, lens, None, None, ks, ks), {}),
           ("int8 bf16 q", (q.bfloat16(), k8, v8, tables, lens, None, None, ks, ks), {}),
           ("strided q", (torch.cat([q, q], -1)[..., ::2], k, v, tables, lens), {}),
           ("mods", good, dict(softcap=2.0, alibi_slopes=torch.rand(4)))]

    def bad(name, i, value, **kw):
        args = list(good)
        args[i] = value
        out.append((name, tuple(args), kw))

    bad("q dtype", 0, q.double())
    bad("q other float", 0, q.half())
    bad("q dims", 0, q[0])
    bad("q head_dim", 0, q[..., :16])
    bad("q heads", 0, q[:, :3])
    bad("q rows", 0, torch.cat([q, q]))
    bad("q meta", 0, q.to("meta"))
    bad("k dtype", 1, k.double())
    bad("v shape", 2, v[:3])
    bad("v dtype", 2, v.half())
    bad("k dims", 1, k[0])
    bad("block size", 1, k[:, :3])
    bad("k meta", 1, k.to("meta"))
    bad("tables int64", 3, tables.long())
    bad("tables 1-d", 3, tables[0])
    bad("tables rows", 3, torch.cat([tables, tables]))
    bad("tables entry", 3, torch.tensor([[2, 4]], dtype=torch.int32))
    bad("tables unread entry", 3, torch.tensor([[2, 0, -7]], dtype=torch.int32))
    bad("tables -1 read", 3, torch.tensor([[2, -1]], dtype=torch.int32))
    bad("tables meta", 3, tables.to("meta"))
    bad("lens int64", 4, lens.long())
    bad("lens long", 4, torch.tensor([33], dtype=torch.int32))
    bad("lens negative", 4, torch.tensor([-1], dtype=torch.int32))
    bad("lens shape", 4, torch.tensor([20, 3], dtype=torch.int32))
    bad("lens 2-d", 4, lens[None])
    bad("not a tensor", 4, [20])
    out.append(("int8 no scales", (q, k8, v8, tables, lens), {}))
    out.append(("scales on float", (q, k, v, tables, lens, None, None, ks, ks), {}))
    out.append(("scale shape", (q, k8, v8, tables, lens, None, None, ks[:2], ks), {}))
    out.append(("bad window", good, dict(window=0)))
    out.append(("bad scale", good, dict(scale=float("nan"))))
    out.append(("bad softcap", good, dict(softcap=-1.0)))
    out.append(("bad slopes", good, dict(alibi_slopes=torch.rand(3))))
    out.append(("nan slopes", good, dict(alibi_slopes=torch.full((4,), float("nan")))))
    return out


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_cpu_decode_fast_path_matches_the_checked_path(monkeypatch, backend):
    """On plain CPU tensors paged_attention leaves the argument checks to the C++ op and runs
    the Python checks only when it raises (paged_ops._decode_cpu_checked_in_cpp). For valid
    calls and each broken argument, that path gives what the Python-checked path gives: the
    same values, or the same error type and message."""
    from frugal import paged_ops

    if not paged_ops._CPP_DECODE[0]:
        pytest.skip("frugal._C has no CPU paged decode")
    calls = []
    real = paged_ops._decode_cpu_checked_in_cpp
    monkeypatch.setattr(paged_ops, "_decode_cpu_checked_in_cpp",
                        lambda *a: calls.append(1) or real(*a))
    for name, args, kwargs in _decode_mutations():
        fast = _outcome(lambda: frugal.paged_attention(*args, backend=backend, **kwargs))
        paged_ops._CPP_DECODE[0] = False
        try:
            checked = _outcome(lambda: frugal.paged_attention(*args, backend=backend, **kwargs))
        finally:
            paged_ops._CPP_DECODE[0] = True
        assert fast[0] == checked[0], (name, fast, checked)
        if fast[0] == "ok":
            assert torch.equal(fast[1], checked[1]), name
        else:
            assert fast[1] == checked[1], name
    assert len(calls) > 20  # the fast path ran (the meta and non-tensor cases do not take it)
