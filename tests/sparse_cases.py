"""Helpers of the block-sparse attention tests (test_sparse_attention_triton,
test_sparse_score_mods): one place, so a test module never imports another."""

import torch


def assert_rule(name, got, ref, plain, dtype, floor):
    """FlashAttention's rule: |got - ref| <= 2 |plain - ref| + floor * max(1, |ref|) (max norms),
    ``got`` of ``dtype`` and ``ref``'s shape, with no NaN or inf (an unwritten, poisoned
    element)."""
    assert got.dtype == dtype and got.shape == ref.shape, (name, got.dtype, got.shape)
    assert torch.isfinite(got).all(), f"{name}: NaN/inf (an unwritten or poisoned element)"
    err = (got.double() - ref).abs().max().item()
    base = (plain.double() - ref).abs().max().item()
    floor = floor * max(1.0, ref.abs().max().item())
    assert err <= 2 * base + floor, f"{name}: max error {err:.3g} > 2 x {base:.3g} + {floor:.2g}"


def random_docs(n, B, gen, num_docs=3):
    """doc ids [B, n]: sorted runs of random lengths."""
    cuts = torch.sort(torch.randint(0, n, (B, num_docs - 1), generator=gen), -1).values
    return (torch.arange(n)[None, None, :] >= cuts[:, :, None]).sum(1).to(torch.int32)
