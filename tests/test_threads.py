"""What README's "Threads" section promises, tested: threads share a BlockMask, an Int8Linear
(forward) and the stateless ops and get what one thread gets. (PagedKVCache: test_paged_plan.)"""

import threading

import torch

import frugal


def _in_threads(fn, n=4, repeat=5):
    results, errors = [None] * n, []

    def work(i):
        try:
            results[i] = [fn(i) for _ in range(repeat)]
        except Exception as exc:  # collected: the assertion names it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_threads_share_a_block_mask_and_the_ops():
    gen = torch.Generator().manual_seed(0)
    n = 200
    mask = frugal.masks.sliding_window(n, 37, block_size=64) & frugal.masks.document(
        torch.arange(n) // 70, block_size=64)  # layouts built on first use, by some thread
    q = torch.randn(1, 4, n, 32, generator=gen)
    k = torch.randn(1, 2, n, 32, generator=gen)
    want = frugal.sparse_attention(q, k, k, frugal.BlockMask.from_dense(
        mask.to_dense()[0, 0], block_size=64))
    for outs in _in_threads(lambda i: frugal.sparse_attention(q, k, k, mask)):
        for out in outs:
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    x = torch.randn(50, 64, generator=gen)
    q8, s8 = frugal.quantize_per_token(x)
    for outs in _in_threads(lambda i: frugal.quantize_per_token(x)):
        assert all(torch.equal(a, q8) and torch.equal(b, s8) for a, b in outs)


def test_threads_share_an_int8_linear_forward():
    gen = torch.Generator().manual_seed(1)
    layer = frugal.Int8Linear.from_float(torch.nn.Linear(96, 40))
    xs = [torch.randn(7, 96, generator=gen) for _ in range(4)]
    want = [layer(x) for x in xs]
    for i, outs in enumerate(_in_threads(lambda i: layer(xs[i]))):
        for out in outs:
            assert torch.equal(out, want[i])
