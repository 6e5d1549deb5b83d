"""Block masks for :func:`frugal.sparse_attention`.

A :class:`BlockMask` cuts the ``Nq x Nk`` attention matrix into ``BQ x BK`` blocks (128 x 128 by
default; 64 is allowed for either) and records, per (batch, head, q-block), which kv-blocks are
*full* (every element allowed: the kernel applies no element test) and which are *partial* (the
kernel evaluates the mask's element rule). Every other block is skipped, which is where the FLOPs
go from O(N^2) to O(N*w).

The element rule of a partial block is one of a few predicates the kernels evaluate in registers
(a band ``q + lo <= k <= q + hi`` that expresses causal and sliding windows in either alignment,
a prefix-LM prefix, document ids) or, for anything else, a packed bitmask per partial block. The
batch and head dims broadcast (size 1 or the call's size). ``docs/block_mask_format.md`` describes
exactly what the kernels read (:meth:`BlockMask.layout`).

Building a mask is plain tensor arithmetic on the block grid: it never compiles anything, and a
causal, windowed or document mask for N = 131072 builds in milliseconds. Masks compose with ``&``
and ``|``; :meth:`BlockMask.to_dense` gives the exact bool mask the kernels apply.

Builders live in :mod:`frugal.masks`. Converters make a mask portable: :meth:`BlockMask.to_dense`
/ :meth:`BlockMask.from_dense`, :meth:`BlockMask.to_flex` / :meth:`BlockMask.from_flex` (PyTorch
FlexAttention) and :meth:`BlockMask.to_bsr` / :meth:`BlockMask.from_bsr` (FlashInfer's
block-sparse-row lists); :meth:`BlockMask.from_mask_mod` takes a FlexAttention-style predicate.
"""

import collections
import dataclasses
import math
from typing import Callable, Optional, Tuple

import torch

from .errors import DeviceError, DTypeError, ShapeError

BAND, PREFIX, DOC, BITS = 1, 2, 4, 8
INF = 1 << 30  # "unbounded" value of lo / hi; positions never reach it
BLOCK_SIZES = (64, 128)
_CHUNK_ELEMENTS = 1 << 25  # elements evaluated at once when a mask is built element by element


def _block_size(block_size, op="BlockMask"):
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    try:
        bq, bk = (int(b) for b in block_size)
    except (TypeError, ValueError):
        raise ShapeError(f"{op}: block_size must be an int or a pair (BQ, BK) from "
                         f"{BLOCK_SIZES}; got {block_size!r}") from None
    if bq not in BLOCK_SIZES or bk not in BLOCK_SIZES:
        raise ShapeError(f"{op}: block_size must be an int or a pair (BQ, BK), each one of "
                         f"{BLOCK_SIZES}; got {block_size!r}")
    return bq, bk


def _length(op, name, n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ShapeError(f"{op}: {name} must be a positive int; got {n!r}")
    return n


def _check_bool(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise DTypeError(f"{op}: {name} must be torch.bool (True = attend); got {t.dtype}")


def _cdiv(a, b):
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class SparseLayout:
    """What the kernels read: a BlockMask's lists broadcast to one call's (B, Hq), on its device.

    See ``docs/block_mask_format.md``. Index tensors are int32 views expanded to
    ``[B, Hq, ...]`` (a broadcast dim has stride 0); a tensor whose flag is off is a 1-element
    dummy. ``lo``, ``hi`` and ``prefix`` are the element rule's values; ``flags`` says which
    parts of the rule apply (BAND | PREFIX | DOC | BITS).
    """

    Nq: int
    Nk: int
    BQ: int
    BK: int
    flags: int
    lo: int
    hi: int
    prefix: int
    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    kv_bits: torch.Tensor
    full_num: torch.Tensor
    full_idx: torch.Tensor
    q_num: torch.Tensor
    q_idx: torch.Tensor
    q_bits: torch.Tensor
    full_q_num: torch.Tensor
    full_q_idx: torch.Tensor
    q_doc: torch.Tensor
    kv_doc: torch.Tensor
    bits: torch.Tensor

    has_band = property(lambda self: bool(self.flags & BAND))
    has_prefix = property(lambda self: bool(self.flags & PREFIX))
    has_doc = property(lambda self: bool(self.flags & DOC))
    has_bits = property(lambda self: bool(self.flags & BITS))

    # The op arguments of a layout, defined once: the custom ops (csrc/ops.cpp,
    # frugal.sparse_attention) take them as ``Tensor[] layout, int[] layout_ints`` in these
    # orders, and the C++ kernels name them through csrc/sparse_layout.h, whose lists a test
    # checks against these. A new rule or modifier is one more name here and there.
    TENSORS = ("kv_num", "kv_idx", "kv_bits", "full_num", "full_idx", "q_num", "q_idx", "q_bits",
               "full_q_num", "full_q_idx", "q_doc", "kv_doc", "bits")
    INTS = ("BQ", "BK", "flags", "lo", "hi", "prefix")

    def op_args(self):
        """``(tensors, ints)``: the layout arguments of the sparse attention ops."""
        return ([getattr(self, n) for n in self.TENSORS], [getattr(self, n) for n in self.INTS])

    @classmethod
    def from_op_args(cls, Nq, Nk, tensors, ints):
        """The layout that :meth:`op_args` gave ``tensors`` and ``ints`` for."""
        if len(tensors) != len(cls.TENSORS) or len(ints) != len(cls.INTS):
            raise ValueError(f"SparseLayout: expected {len(cls.TENSORS)} tensors "
                             f"{cls.TENSORS} and {len(cls.INTS)} ints {cls.INTS}; got "
                             f"{len(tensors)} and {len(ints)}")
        return cls(Nq=Nq, Nk=Nk, **dict(zip(cls.TENSORS, tensors)), **dict(zip(cls.INTS, ints)))

    def replace(self, **fields):
        """A copy with ``fields`` replaced (tests build bad layouts this way)."""
        return dataclasses.replace(self, **fields)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """The element rule of partial blocks (see the module docstring); all None: no test."""

    lo: Optional[int] = None
    hi: Optional[int] = None
    prefix: Optional[int] = None
    q_doc: Optional[torch.Tensor] = None   # int32 [Bd, Nq]
    kv_doc: Optional[torch.Tensor] = None  # int32 [Bd, Nk]

    @property
    def has_band(self):
        return self.lo is not None

    @property
    def has_doc(self):
        return self.q_doc is not None

    def flags(self):
        return ((BAND if self.has_band else 0) | (PREFIX if self.prefix is not None else 0)
                | (DOC if self.has_doc else 0))

    def evaluate(self, b, q, k):
        """Bool tensor: the rule at (b, q, k), int64 index tensors that broadcast."""
        ok = torch.ones((), dtype=torch.bool, device=q.device)
        if self.has_band:
            band = (k >= q + self.lo) & (k <= q + self.hi)
            if self.prefix is not None:
                band = band | (k < self.prefix)
            ok = ok & band
        if self.has_doc:
            bd = self.q_doc.shape[0]
            qd = self.q_doc.to(q.device)
            kd = self.kv_doc.to(q.device)
            ok = ok & (qd[b % bd, q] == kd[b % bd, k])
        return ok

    def classify(self, nq, nk, bq, bk):
        """(full, any) bool [Bd|1, 1, nQB, nKB]: blocks whose every in-bounds element the rule
        allows, and blocks where it may allow some (a superset of the exact set)."""
        q0 = torch.arange(0, nq, bq)
        q1 = torch.clamp(q0 + bq, max=nq) - 1
        k0 = torch.arange(0, nk, bk)
        k1 = torch.clamp(k0 + bk, max=nk) - 1
        q0, q1, k0, k1 = q0[:, None], q1[:, None], k0[None, :], k1[None, :]
        full = torch.ones(len(q0), k0.shape[1], dtype=torch.bool)
        any_ = full.clone()
        if self.has_band:
            full = (k0 >= q1 + self.lo) & (k1 <= q0 + self.hi)
            any_ = (k1 >= q0 + self.lo) & (k0 <= q1 + self.hi)
            if self.prefix is not None:
                full = full | (k1 < self.prefix)
                any_ = any_ | (k0 < self.prefix)
        full, any_ = full[None, None], any_[None, None]
        if self.has_doc:
            qmin, qmax = _block_range(self.q_doc, bq)
            kmin, kmax = _block_range(self.kv_doc, bk)
            qmin, qmax = qmin[:, None, :, None], qmax[:, None, :, None]
            kmin, kmax = kmin[:, None, None, :], kmax[:, None, None, :]
            full = full & (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
            any_ = any_ & (qmin <= kmax) & (kmin <= qmax)
        return full, any_


def _block_range(ids, block):
    """Per-block min and max of ids [Bd, N] -> two [Bd, ceil(N / block)] tensors."""
    bd, n = ids.shape
    pad = _cdiv(n, block) * block - n
    x = ids.long().cpu()
    lo = torch.nn.functional.pad(x, (0, pad), value=1 << 62)
    hi = torch.nn.functional.pad(x, (0, pad), value=-(1 << 62))
    return lo.view(bd, -1, block).amin(-1), hi.view(bd, -1, block).amax(-1)


def _pack_bits(dense):
    """bool [P, BQ, BK] -> int32 [P, BQ, BK // 32]: bit (r, c) is word c >> 5, bit c & 31."""
    p, bq, bk = dense.shape
    # Bit 31 weighs -2**31 in int32 and the others sum to at most 2**31 - 1, so the int32 sum
    # of distinct bits never overflows: it is exactly the two's-complement word.
    weights = torch.ones(32, dtype=torch.int32, device=dense.device) << torch.arange(
        32, dtype=torch.int32, device=dense.device)
    words = dense.reshape(p, bq, bk // 32, 32).to(torch.int32) * weights
    return words.sum(-1, dtype=torch.int32)


def _unpack_bits(words, bk):
    """int32 [P, BQ, BK // 32] -> bool [P, BQ, BK]."""
    shifts = torch.arange(32, device=words.device)
    bits = (words.long()[..., None] >> shifts) & 1
    return bits.view(*words.shape[:-1], bk).bool()


def _index_grid(bm, hm, q, k):
    """Broadcastable int64 index tensors (b, h, q, k) of shape [Bm|1, Hm|1, len(q), len(k)]."""
    dev = q.device
    return (torch.arange(bm, device=dev)[:, None, None, None],
            torch.arange(hm, device=dev)[None, :, None, None],
            q[None, None, :, None], k[None, None, None, :])


class BlockMask:
    """A block-sparse attention mask; see the module docstring and ``frugal.masks``.

    Build one with the builders in :mod:`frugal.masks`, :meth:`from_dense` or
    :meth:`from_mask_mod`; combine with ``&`` and ``|``.

    Attributes
    ----------
    seq_lens : (int, int)
        (Nq, Nk) the mask was built for.
    block_size : (int, int)
        (BQ, BK).
    shape : (int, int, int, int)
        (Bm, Hm, Nq, Nk); Bm and Hm are 1 where the mask broadcasts.
    """

    def __init__(self, seq_lens, block_size, full, partial, rule=None, bits=None,
                 bits_index=None, mask_mod=None, _lists_source=None):
        # Internal: use the builders. full / partial are bool [Bm, Hm, nQB, nKB] (CPU, disjoint);
        # with bits, bits_index int32 [Bm, Hm, nQB, nKB] gives each partial block's row of bits.
        self.seq_lens = tuple(seq_lens)
        self.block_size = tuple(block_size)
        self._full = full
        self._partial = partial
        self._rule = rule if rule is not None else _Rule()
        self._bits = bits
        self._bits_index = bits_index
        self._mask_mod = mask_mod
        self._layouts = {}
        self._lists = None

    # ----------------------------------------------------------------------------- basics

    @property
    def shape(self):
        return (self._full.shape[0], self._full.shape[1]) + self.seq_lens

    @property
    def num_blocks(self):
        """(nQB, nKB)."""
        return tuple(self._full.shape[2:])

    @property
    def has_bits(self):
        return self._bits is not None

    @property
    def flags(self):
        return self._rule.flags() | (BITS if self.has_bits else 0)

    def mask_mod(self):
        """The mask as a FlexAttention-style predicate ``fn(b, h, q_idx, kv_idx) -> bool
        tensor`` on broadcastable int64 index tensors (b and h index this mask's own batch and
        head dims, so size-1 dims take index 0)."""
        if self._mask_mod is not None:
            return self._mask_mod
        return self._dense_mod()

    def _dense_mod(self):
        rule, bq, bk = self._rule, *self.block_size
        full, partial = self._full, self._partial
        bits, bidx = self._bits, self._bits_index
        bm, hm = full.shape[:2]

        def mod(b, h, q, k):
            b, h = b % bm, h % hm
            qb, kb = q // bq, k // bk
            dev = q.device
            f = full.to(dev)[b, h, qb, kb]
            p = partial.to(dev)[b, h, qb, kb]
            ok = rule.evaluate(b, q, k)
            if bits is not None:
                row = bidx.to(dev)[b, h, qb, kb].clamp(min=0).long()
                word = bits.to(dev)[row, q % bq, (k % bk) >> 5].long()
                ok = ok & (((word >> (k & 31)) & 1) == 1)
            return f | (p & ok)

        return mod

    def density(self):
        """Fraction of the (B, H, Nq, Nk) score matrix the kernels compute (full and partial
        blocks, clipped at the ragged ends): the cost relative to dense attention."""
        nq, nk = self.seq_lens
        bq, bk = self.block_size
        rows = torch.clamp(nq - torch.arange(0, nq, bq), max=bq).double()
        cols = torch.clamp(nk - torch.arange(0, nk, bk), max=bk).double()
        area = rows[:, None] * cols[None, :]
        visited = (self._full | self._partial).double()
        return float((visited * area).sum() / (area.sum() * visited.shape[0] * visited.shape[1]))

    def sparsity(self):
        """``1 - density()``: the fraction of the score matrix the kernels skip."""
        return 1.0 - self.density()

    def counts(self):
        """(full, partial) block counts summed over the mask's batch and head dims."""
        return int(self._full.sum()), int(self._partial.sum())

    def __repr__(self):
        bm, hm, nq, nk = self.shape
        full, partial = self.counts()
        rule = []
        r = self._rule
        if r.has_band:
            lo = "-inf" if r.lo <= -INF else str(r.lo)
            hi = "+inf" if r.hi >= INF else str(r.hi)
            rule.append(f"band q{'' if lo.startswith('-') else '+'}{lo} <= k <= "
                        f"q{'' if hi.startswith('-') else '+'}{hi}")
        if r.prefix is not None:
            rule.append(f"prefix {r.prefix}")
        if r.has_doc:
            rule.append("document ids")
        if self.has_bits:
            rule.append(f"bitmask ({self._bits.shape[0]} distinct block patterns)")
        lines = [f"BlockMask(shape=({bm}, {hm}, {nq}, {nk}), block_size={self.block_size}, "
                 f"full={full}, partial={partial}, density={self.density():.2%}, "
                 f"rule={' & '.join(rule) or 'none'})"]
        nqb, nkb = self.num_blocks
        if nqb <= 32 and nkb <= 64:
            # One character per block of batch 0, head 0: full, partial, skipped.
            f, p = self._full[0, 0], self._partial[0, 0]
            if bm * hm > 1:
                lines.append("  blocks of batch 0, head 0 (█ full, ░ partial, · skipped):")
            for i in range(nqb):
                lines.append("  " + "".join("█" if f[i, j] else "░" if p[i, j] else "·"
                                            for j in range(nkb)))
        return "\n".join(lines)

    # ----------------------------------------------------------------------------- lists

    def _build_lists(self):
        # Built into a local and published whole: threads sharing a mask may race here, and a
        # half-filled dict must never be visible (each thread builds the same lists).
        if self._lists is None:
            bidx = self._bits_index
            lists = {}
            for prefix, matrix in (("kv", self._partial), ("full", self._full)):
                lists[prefix] = _lists(matrix, bidx if prefix == "kv" else None)
            t = self._partial.transpose(-1, -2)
            lists["q"] = _lists(t, None if bidx is None else bidx.transpose(-1, -2))
            lists["full_q"] = _lists(self._full.transpose(-1, -2), None)
            self._lists = lists
        return self._lists

    def layout(self, B, Hq, device="cpu"):
        """The kernels' view of this mask for a call with batch ``B`` and ``Hq`` query heads on
        ``device`` (a :class:`SparseLayout`; cached per device).

        Raises
        ------
        ShapeError
            The mask's batch or head dim is neither 1 nor the call's.
        """
        bm, hm = self.shape[:2]
        if bm not in (1, B):
            raise ShapeError(f"sparse_attention: mask batch dim must be 1 or B={B}; the mask "
                             f"was built for batch {bm}")
        if hm not in (1, Hq):
            raise ShapeError(f"sparse_attention: mask head dim must be 1 or Hq={Hq}; the mask "
                             f"was built for {hm} heads")
        device = torch.device(device)
        key = str(device)
        if key not in self._layouts:
            lists = self._build_lists()
            r = self._rule
            t = {}
            for name, (num, idx, bits_row) in lists.items():
                t[f"{name}_num"] = num.to(device)
                t[f"{name}_idx"] = idx.to(device)
                if name in ("kv", "q"):
                    t[f"{name}_bits"] = bits_row.to(device) if bits_row is not None else None
            t["q_doc"] = r.q_doc.to(device) if r.has_doc else None
            t["kv_doc"] = r.kv_doc.to(device) if r.has_doc else None
            t["bits"] = self._bits.to(device) if self.has_bits else None
            self._layouts[key] = t
        t = self._layouts[key]
        dummy1 = torch.zeros(1, dtype=torch.int32, device=device)

        def bh(x, tail):
            if x is None:
                return dummy1.view((1,) * (2 + tail)).expand((B, Hq) + (1,) * tail)
            return x.expand((B, Hq) + tuple(x.shape[2:]))

        def b_only(x):
            if x is None:
                return dummy1.view(1, 1).expand(B, 1)
            return x.expand(B, x.shape[1])

        r = self._rule
        return SparseLayout(
            Nq=self.seq_lens[0], Nk=self.seq_lens[1], BQ=self.block_size[0],
            BK=self.block_size[1], flags=self.flags,
            lo=r.lo if r.has_band else -INF, hi=r.hi if r.has_band else INF,
            prefix=r.prefix if r.prefix is not None else 0,
            kv_num=bh(t["kv_num"], 1), kv_idx=bh(t["kv_idx"], 2), kv_bits=bh(t["kv_bits"], 2),
            full_num=bh(t["full_num"], 1), full_idx=bh(t["full_idx"], 2),
            q_num=bh(t["q_num"], 1), q_idx=bh(t["q_idx"], 2), q_bits=bh(t["q_bits"], 2),
            full_q_num=bh(t["full_q_num"], 1), full_q_idx=bh(t["full_q_idx"], 2),
            q_doc=b_only(t["q_doc"]), kv_doc=b_only(t["kv_doc"]),
            bits=t["bits"] if t["bits"] is not None else dummy1.view(1, 1, 1),
        )

    # ----------------------------------------------------------------------------- dense

    def to_dense(self, device="cpu"):
        """The exact bool mask [Bm, Hm, Nq, Nk] the kernels apply (True: attend)."""
        nq, nk = self.seq_lens
        bm, hm = self.shape[:2]
        q = torch.arange(nq, device=device)
        k = torch.arange(nk, device=device)
        return self._dense_mod()(*_index_grid(bm, hm, q, k)).expand(bm, hm, nq, nk).clone()

    def _block_matrices(self):
        return self._full, self._partial

    # ----------------------------------------------------------------------------- algebra

    def _check_compatible(self, other, op):
        if not isinstance(other, BlockMask):
            return NotImplemented
        if self.seq_lens != other.seq_lens:
            raise ShapeError(f"BlockMask {op}: masks must have the same (Nq, Nk); got "
                             f"{self.seq_lens} and {other.seq_lens}")
        if self.block_size != other.block_size:
            raise ShapeError(f"BlockMask {op}: masks must have the same block_size; got "
                             f"{self.block_size} and {other.block_size}")
        for dim, name in ((0, "batch"), (1, "head")):
            a, b = self.shape[dim], other.shape[dim]
            if a != b and 1 not in (a, b):
                raise ShapeError(f"BlockMask {op}: {name} dims must match or be 1; got {a} "
                                 f"and {b}")
        return None

    def __and__(self, other):
        bad = self._check_compatible(other, "&")
        if bad is not None:
            return bad
        full = self._full & other._full
        any_ = (self._full | self._partial) & (other._full | other._partial)
        mod_a, mod_b = self.mask_mod(), other.mask_mod()

        def mod(b, h, q, k):
            return mod_a(b, h, q, k) & mod_b(b, h, q, k)

        rule = _merge_and(self, other)
        if rule is not None:
            return BlockMask(self.seq_lens, self.block_size, full, any_ & ~full, rule,
                             mask_mod=mod)
        return _with_bits(self.seq_lens, self.block_size, full, any_ & ~full, mod)

    def __or__(self, other):
        bad = self._check_compatible(other, "|")
        if bad is not None:
            return bad
        full = self._full | other._full
        any_ = self._full | self._partial | other._full | other._partial
        mod_a, mod_b = self.mask_mod(), other.mask_mod()

        def mod(b, h, q, k):
            return mod_a(b, h, q, k) | mod_b(b, h, q, k)

        return _with_bits(self.seq_lens, self.block_size, full, any_ & ~full, mod)

    # ----------------------------------------------------------------------------- converters

    def to_flex(self, device="cpu"):
        """This mask as a ``torch.nn.attention.flex_attention.BlockMask`` for ``flex_attention``.

        Same block size, lengths and batch/head dims; its partial lists are our partial blocks,
        its full lists our full blocks, and its ``mask_mod`` is this mask's exact predicate
        (:meth:`mask_mod` as the kernels apply it: rule, document ids and bitmasks), so the
        FlexAttention result equals ours. Index tensors are int32 on ``device``, padded to
        ``nKB`` entries per row as ``create_block_mask`` makes them.
        """
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        lists = self._build_lists()
        nkb = self.num_blocks[1]

        def pad(idx):
            return torch.nn.functional.pad(idx, (0, nkb - idx.shape[-1])).to(device)

        kv_num, kv_idx, _ = lists["kv"]
        full_num, full_idx, _ = lists["full"]
        return FlexBlockMask.from_kv_blocks(
            kv_num.to(device), pad(kv_idx), full_num.to(device), pad(full_idx),
            BLOCK_SIZE=self.block_size, mask_mod=self._dense_mod(), seq_lengths=self.seq_lens)

    @classmethod
    def from_flex(cls, flex_mask):
        """A BlockMask from a FlexAttention ``BlockMask`` (``create_block_mask`` or
        ``BlockMask.from_kv_blocks``), with FlexAttention's semantics: blocks in its full lists
        are all allowed, blocks in neither list are skipped, and in its partial blocks its
        ``mask_mod`` decides; those become bitmasks (the mask_mod runs on partial blocks only,
        broadcasting, or through ``torch.vmap`` when it needs scalars). Its block size must be
        one of (64, 128) per side.

        Raises
        ------
        TypeError
            ``flex_mask`` is not a FlexAttention BlockMask.
        ShapeError
            Unsupported block size, or lists that do not fit its sequence lengths.
        """
        op = "BlockMask.from_flex"
        names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "BLOCK_SIZE", "seq_lengths", "mask_mod")
        if not all(hasattr(flex_mask, n) for n in names):
            raise TypeError(f"{op}: flex_mask must be a torch.nn.attention.flex_attention."
                            f"BlockMask; got {type(flex_mask).__name__}")
        bq, bk = _block_size(flex_mask.BLOCK_SIZE, op)
        nq, nk = (int(n) for n in flex_mask.seq_lengths)
        nqb, nkb = _cdiv(nq, bq), _cdiv(nk, bk)
        if flex_mask.kv_num_blocks.shape[-1] != nqb:
            raise ShapeError(f"{op}: flex_mask.kv_num_blocks must have ceil(Nq / BQ) = {nqb} "
                             f"q-blocks for seq_lengths {(nq, nk)}; got "
                             f"{flex_mask.kv_num_blocks.shape[-1]}")
        partial = _lists_to_matrix(op, "kv_indices", flex_mask.kv_num_blocks,
                                   flex_mask.kv_indices, nkb)
        if flex_mask.full_kv_num_blocks is not None:
            full = _lists_to_matrix(op, "full_kv_indices", flex_mask.full_kv_num_blocks,
                                    flex_mask.full_kv_indices, nkb)
        else:
            full = torch.zeros_like(partial)
        full, partial = torch.broadcast_tensors(full, partial)
        full = full.contiguous()
        mask = _with_bits((nq, nk), (bq, bk), full, (partial & ~full).contiguous(),
                          _broadcasting(flex_mask.mask_mod))
        mask._mask_mod = None  # FlexAttention semantics: full blocks skip the mask_mod
        return mask

    def to_bsr(self, block_masks=False):
        """This mask in block-sparse-row form (FlashInfer's ``BlockSparseAttentionWrapper``
        convention: ``indptr`` / ``indices`` over the ``R x C = BQ x BK`` block grid).

        Returns
        -------
        BSR (named tuple)
            ``indptr`` int32 [Bm, Hm, nQB + 1]: the visited kv-blocks of q-block ``i`` of
            (b, h) are ``indices[indptr[b, h, i]:indptr[b, h, i + 1]]`` (offsets into one flat
            ``indices``, (b, h) after (b, h - 1); for Bm = Hm = 1, ``indptr[0, 0]`` is exactly
            FlashInfer's indptr); ``indices`` int32 [nnz], ascending within each row;
            ``is_full`` bool [nnz]: whether the block needs no element test; ``block_mask``
            bool [nnz, BQ, BK] (FlashInfer's ``mask`` argument: the exact elements of every
            listed block, False past Nq / Nk) when ``block_masks=True``, else None.
        """
        visited = self._full | self._partial
        bm, hm, nqb, _ = visited.shape
        flat = torch.zeros(bm * hm * nqb + 1, dtype=torch.int64)
        flat[1:] = visited.sum(-1).reshape(-1).cumsum(0)
        if int(flat[-1]) >= 2 ** 31:
            raise ShapeError(f"BlockMask.to_bsr: {int(flat[-1])} blocks do not fit int32 "
                             f"indices")
        rows = (torch.arange(bm * hm) * nqb)[:, None] + torch.arange(nqb + 1)
        indptr = flat[rows].view(bm, hm, nqb + 1).to(torch.int32)
        where = visited.nonzero()
        at = tuple(where.t())
        dense = None
        if block_masks:
            mod = self._dense_mod()
            step = max(1, _CHUNK_ELEMENTS // (self.block_size[0] * self.block_size[1]))
            dense = torch.cat([_eval_blocks(mod, where[s:s + step], self.seq_lens,
                                            self.block_size)[0]
                               for s in range(0, len(where), step)]
                              or [torch.zeros(0, *self.block_size, dtype=torch.bool)])
        return BSR(indptr, where[:, 3].to(torch.int32).contiguous(), self._full[at], dense)

    @classmethod
    def from_bsr(cls, indptr, indices, seq_lens, block_size=128, block_mask=None):
        """A BlockMask from block-sparse-row lists (the inverse of :meth:`to_bsr`).

        Parameters
        ----------
        indptr : int tensor [nQB + 1] or [Bm, Hm, nQB + 1]
            Row pointers into ``indices`` (non-decreasing within each (b, h)).
        indices : int tensor [nnz]
            kv-block indices in [0, nKB); a block may be listed once per row.
        seq_lens : (int, int)
            (Nq, Nk); nQB = ceil(Nq / BQ).
        block_size : int or (int, int)
            (BQ, BK), each 64 or 128.
        block_mask : bool tensor [nnz, BQ, BK], optional
            The allowed elements of each listed block (FlashInfer's ``mask``); elements past
            Nq / Nk are ignored. Without it every listed block is full.

        Raises
        ------
        DTypeError
            Non-integer ``indptr`` / ``indices`` or a non-bool ``block_mask``.
        ShapeError
            Anything that does not fit: lengths, block size, pointer range, duplicate or
            out-of-range indices, a ``block_mask`` of the wrong shape.
        """
        op = "BlockMask.from_bsr"
        bq, bk = _block_size(block_size, op)
        try:
            nq, nk = seq_lens
        except (TypeError, ValueError):
            raise ShapeError(f"{op}: seq_lens must be a pair (Nq, Nk); got {seq_lens!r}") from None
        nq, nk = _length(op, "seq_lens[0] (Nq)", nq), _length(op, "seq_lens[1] (Nk)", nk)
        nqb, nkb = _cdiv(nq, bq), _cdiv(nk, bk)
        for name, t in (("indptr", indptr), ("indices", indices)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise DTypeError(f"{op}: {name} must be an integer tensor; got {t.dtype}")
        if indptr.dim() not in (1, 3) or indptr.shape[-1] != nqb + 1:
            raise ShapeError(f"{op}: indptr must be [nQB + 1] or [Bm, Hm, nQB + 1] with nQB = "
                             f"ceil(Nq / BQ) = {nqb}; got shape {tuple(indptr.shape)}")
        if indices.dim() != 1:
            raise ShapeError(f"{op}: indices must be 1-d; got shape {tuple(indices.shape)}")
        shape = (1, 1) if indptr.dim() == 1 else tuple(indptr.shape[:2])
        if 0 in shape:
            raise ShapeError(f"{op}: indptr must have non-empty batch and head dims; got shape "
                             f"{tuple(indptr.shape)}")
        ptr = indptr.long().cpu().reshape(-1, nqb + 1)
        starts, ends = ptr[:, :-1].reshape(-1), ptr[:, 1:].reshape(-1)
        if bool((ends < starts).any()) or int(starts.min()) < 0 or int(ends.max()) > len(indices):
            raise ShapeError(f"{op}: indptr must be non-decreasing within each (b, h) row and "
                             f"point into indices (length {len(indices)}); got values from "
                             f"{int(ptr.min())} to {int(ptr.max())}")
        counts = ends - starts
        n = int(counts.sum())
        rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
        pos = (torch.repeat_interleave(starts - (counts.cumsum(0) - counts), counts)
               + torch.arange(n))
        kb = indices.long().cpu()[pos]
        if n and (int(kb.min()) < 0 or int(kb.max()) >= nkb):
            raise ShapeError(f"{op}: indices must be kv-blocks in [0, nKB = {nkb}); got values "
                             f"from {int(kb.min())} to {int(kb.max())}")
        cell = rows * nkb + kb
        hits = torch.zeros(len(counts) * nkb, dtype=torch.int32).index_add_(
            0, cell, torch.ones(n, dtype=torch.int32))
        if bool((hits > 1).any()):
            raise ShapeError(f"{op}: indices must not list a kv-block twice in one row")
        listed = (hits > 0).view(*shape, nqb, nkb)
        if block_mask is None:
            return cls((nq, nk), (bq, bk), listed, torch.zeros_like(listed))
        _check_bool(op, "block_mask", block_mask)
        if tuple(block_mask.shape) != (len(indices), bq, bk):
            raise ShapeError(f"{op}: block_mask must be [nnz, BQ, BK] = "
                             f"{[len(indices), bq, bk]}; got {list(block_mask.shape)}")
        lookup = torch.full((len(counts) * nkb,), -1, dtype=torch.int64)
        lookup[cell] = pos
        lookup = lookup.view(*shape, nqb, nkb)
        elements = block_mask.cpu()
        bm, hm = shape

        def mod(b, h, q, k):
            i = lookup.to(q.device)[b % bm, h % hm, q // bq, k // bk]
            return (i >= 0) & elements.to(q.device)[i.clamp(min=0), q % bq, k % bk]

        mask = _with_bits((nq, nk), (bq, bk), torch.zeros_like(listed), listed, mod)
        mask._mask_mod = None  # the bitmasks hold it; do not keep the dense blocks alive
        return mask

    # ----------------------------------------------------------------------------- builders

    @classmethod
    def from_dense(cls, mask, block_size=128):
        """An exact BlockMask from a bool mask [Nq, Nk], [H, Nq, Nk] or [B, H, Nq, Nk]
        (True: attend; size-1 batch or head dims broadcast). Partial blocks get bitmasks."""
        _check_bool("BlockMask.from_dense", "mask", mask)
        if mask.dim() not in (2, 3, 4) or mask.numel() == 0:
            raise ShapeError(f"BlockMask.from_dense: mask must be a non-empty [Nq, Nk], "
                             f"[H, Nq, Nk] or [B, H, Nq, Nk] bool tensor; got shape "
                             f"{tuple(mask.shape)}")
        while mask.dim() < 4:
            mask = mask[None]
        mask = mask.cpu()
        bm, hm, nq, nk = mask.shape

        def mod(b, h, q, k):
            return mask.to(q.device)[b % bm, h % hm, q, k]

        return _from_elements((nq, nk), _block_size(block_size, "BlockMask.from_dense"), bm, hm,
                              lambda q0, q1: mask[:, :, q0:q1], mod)

    @classmethod
    def from_mask_mod(cls, mask_mod, B, H, Nq, Nk, block_size=128, device="cpu"):
        """An exact BlockMask from a FlexAttention-style predicate
        ``mask_mod(b, h, q_idx, kv_idx) -> bool``, evaluated vectorized: it is called with
        broadcastable int64 tensors and must use tensor ops (``&``, ``|``, ``torch.where``)
        rather than Python ``if``/``and``. ``B`` or ``H`` None means the mask does not depend
        on it (broadcast). Cost: Nq * Nk evaluations, in chunks.
        """
        op = "BlockMask.from_mask_mod"
        if not callable(mask_mod):
            raise TypeError(f"{op}: mask_mod must be callable fn(b, h, q_idx, kv_idx); got "
                            f"{type(mask_mod).__name__}")
        bm = 1 if B is None else _length(op, "B", B)
        hm = 1 if H is None else _length(op, "H", H)
        nq, nk = _length(op, "Nq", Nq), _length(op, "Nk", Nk)
        device = torch.device(device)

        def mod(b, h, q, k):
            try:
                out = mask_mod(b, h, q, k)
            except RuntimeError as e:
                raise TypeError(f"{op}: mask_mod must work on broadcastable index tensors "
                                f"(use &, |, ~ and torch.where instead of and/or/if); calling "
                                f"it failed with: {e}") from e
            if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
                raise DTypeError(f"{op}: mask_mod must return a bool tensor; got "
                                 f"{getattr(out, 'dtype', type(out).__name__)}")
            return out

        kk = torch.arange(nk, device=device)

        def rows(q0, q1):
            grid = _index_grid(bm, hm, torch.arange(q0, q1, device=device), kk)
            return mod(*grid).expand(bm, hm, q1 - q0, nk).cpu()

        return _from_elements((nq, nk), _block_size(block_size, op), bm, hm, rows, mod)


BSR = collections.namedtuple("BSR", "indptr indices is_full block_mask")
BSR.__doc__ = "Block-sparse-row form of a BlockMask; see :meth:`BlockMask.to_bsr`."


def _lists_to_matrix(op, name, num, idx, nkb):
    """FlexAttention-style (num [..., nQB], idx [..., nQB, W]) -> bool [B, H, nQB, nKB]."""
    num, idx = num.cpu().long(), idx.cpu().long()
    while num.dim() < 3:
        num, idx = num[None], idx[None]
    valid = torch.arange(idx.shape[-1]) < num[..., None]
    if bool((valid & ((idx < 0) | (idx >= nkb))).any()):
        raise ShapeError(f"{op}: flex_mask.{name} must hold kv-blocks in [0, {nkb}) for its "
                         f"seq_lengths")
    col = torch.where(valid, idx, nkb)
    out = torch.zeros(*idx.shape[:-1], nkb + 1, dtype=torch.bool)
    return out.scatter_(-1, col, True)[..., :nkb].contiguous()


def _broadcasting(mask_mod):
    """A FlexAttention mask_mod called on broadcastable index tensors: directly when it
    broadcasts, else element by element through torch.vmap."""

    def mod(b, h, q, k):
        shape = torch.broadcast_shapes(b.shape, h.shape, q.shape, k.shape)
        try:
            out = mask_mod(b, h, q, k)
            if isinstance(out, torch.Tensor) and out.dtype == torch.bool:
                return out.expand(shape)
        except (RuntimeError, IndexError, TypeError, ValueError):
            pass
        args = [x.expand(shape).reshape(-1) for x in (b, h, q, k)]
        return torch.vmap(mask_mod)(*args).view(shape).bool()

    return mod


def _eval_blocks(mod, where, seq_lens, block_size):
    """Elements of blocks ``where`` [P, 4] (b, h, qb, kb) under ``mod``: (bool [P, BQ, BK],
    False past Nq / Nk; in-bounds bool [P, BQ, BK])."""
    nq, nk = seq_lens
    bq, bk = block_size
    b = where[:, 0, None, None]
    h = where[:, 1, None, None]
    q = where[:, 2, None, None] * bq + torch.arange(bq)[None, :, None]
    k = where[:, 3, None, None] * bk + torch.arange(bk)[None, None, :]
    inb = (q < nq) & (k < nk)
    dense = mod(b, h, q.clamp(max=nq - 1), k.clamp(max=nk - 1)) & inb
    return dense.expand(len(where), bq, bk), inb


def _lists(matrix, bits_index):
    """bool [Bm, Hm, nA, nB] -> (num int32 [Bm, Hm, nA], idx int32 [Bm, Hm, nA, max(1, max
    num)] ascending and 0-padded, bits rows int32 of idx's shape or None)."""
    num = matrix.sum(-1, dtype=torch.int32)
    width = max(1, int(num.max())) if num.numel() else 1
    # nonzero() lists the set blocks in row-major order, so ascending within each row; a
    # block's slot is its rank in its row.
    nz = matrix.nonzero()
    lead = matrix.shape[:-1]
    row = torch.zeros(len(nz), dtype=torch.int64)
    for d, size in enumerate(lead):
        row = row * size + nz[:, d]
    starts = torch.cumsum(num.reshape(-1), 0, dtype=torch.int64) - num.reshape(-1)
    slot = torch.arange(len(nz)) - starts[row]
    idx = torch.zeros(num.numel(), width, dtype=torch.int32)
    idx[row, slot] = nz[:, -1].to(torch.int32)
    rows = None
    if bits_index is not None:
        rows = torch.zeros(num.numel(), width, dtype=torch.int32)
        rows[row, slot] = bits_index[tuple(nz.t())].to(torch.int32)
        rows = rows.view(*lead, width)
    return num.contiguous(), idx.view(*lead, width), rows


def _row_classes(mat):
    """Class id (0..n-1) of each row of int64 [P, K]: equal rows, equal ids."""
    if len(mat) == 0:
        return torch.zeros(0, dtype=torch.int64)
    lo = mat.amin(0)
    spans = (mat.amax(0) - lo + 1).tolist()
    if math.prod(spans) < 2 ** 62:  # one int64 code per row: a 1-d unique is much faster
        radix = torch.tensor([math.prod(spans[i + 1:]) for i in range(len(spans))])
        return torch.unique(((mat - lo) * radix).sum(1), return_inverse=True)[1]
    return torch.unique(mat, dim=0, return_inverse=True)[1]


def _merge_and(a, b):
    """The rule of a & b when both are rule-based and it can be expressed as one rule."""
    if a.has_bits or b.has_bits:
        return None
    ra, rb = a._rule, b._rule
    if ra.has_doc and rb.has_doc:
        return None
    lo = hi = prefix = None
    if ra.has_band and rb.has_band:
        if ra.prefix is not None or rb.prefix is not None:
            return None
        lo, hi = max(ra.lo, rb.lo), min(ra.hi, rb.hi)
    elif ra.has_band or rb.has_band:
        r = ra if ra.has_band else rb
        lo, hi, prefix = r.lo, r.hi, r.prefix
    doc = ra if ra.has_doc else rb
    return _Rule(lo, hi, prefix, doc.q_doc, doc.kv_doc)


def _with_bits(seq_lens, block_size, full, partial, mod, key=None):
    """A mask whose partial blocks carry bitmasks of ``mod`` (evaluated on those blocks only);
    all-false partial blocks are dropped and all-true ones promoted to full.

    ``key``, when given, is a list of int64 tensors broadcastable to ``partial``'s shape: blocks
    whose key columns are all equal promise the same element pattern, so ``mod`` is evaluated
    on one block per distinct key (blocks at a ragged end are kept apart automatically) and
    they share one bitmask row. That is what keeps a strided or longformer mask for N = 131072
    cheap: a few hundred distinct blocks instead of tens of thousands.
    """
    nq, nk = seq_lens
    bq, bk = block_size
    nqb, nkb = _cdiv(nq, bq), _cdiv(nk, bk)
    where = partial.nonzero()  # [P, 4]: b, h, qb, kb
    if key is None:
        reps, inverse = where, None
    else:
        at = tuple(where.t())
        cols = [k.expand(partial.shape)[at].long() for k in key]
        cols.append(((where[:, 2] == nqb - 1) & (nq % bq != 0)).long() * 2
                    + ((where[:, 3] == nkb - 1) & (nk % bk != 0)).long())
        inverse = _row_classes(torch.stack(cols, 1))
        n_cls = int(inverse.max()) + 1 if len(inverse) else 0
        first = torch.full((n_cls,), len(where), dtype=torch.int64).scatter_reduce_(
            0, inverse, torch.arange(len(where)), "amin")
        reps = where[first]
    chunk = max(1, _CHUNK_ELEMENTS // (bq * bk))
    words = []
    keep_partial = torch.zeros(len(reps), dtype=torch.bool)
    make_full = torch.zeros(len(reps), dtype=torch.bool)
    for s in range(0, len(reps), chunk):
        dense, inb = _eval_blocks(mod, reps[s:s + chunk], seq_lens, block_size)
        n_true = dense.flatten(1).sum(1, dtype=torch.int32)
        n_inb = inb.expand(dense.shape).flatten(1).sum(1, dtype=torch.int32)
        keep_partial[s:s + chunk] = (n_true > 0) & (n_true < n_inb)
        make_full[s:s + chunk] = (n_true > 0) & (n_true == n_inb)
        words.append(_pack_bits(dense)[keep_partial[s:s + chunk]])
    # Row of bits of each kept representative, then of each block.
    rows = torch.cumsum(keep_partial, 0, dtype=torch.int32) - 1
    if inverse is not None:
        keep_partial, make_full, rows = keep_partial[inverse], make_full[inverse], rows[inverse]
    full = full.clone()
    full[tuple(where[make_full].t())] = True
    new_partial = torch.zeros_like(partial)
    kept = where[keep_partial]
    new_partial[tuple(kept.t())] = True
    bits = torch.cat(words) if words else torch.zeros(0, bq, bk // 32, dtype=torch.int32)
    if len(kept) == 0:
        return BlockMask(seq_lens, block_size, full, new_partial, mask_mod=mod)
    bits_index = torch.full(partial.shape, -1, dtype=torch.int32)
    bits_index[tuple(kept.t())] = rows[keep_partial]
    return BlockMask(seq_lens, block_size, full, new_partial, bits=bits.contiguous(),
                     bits_index=bits_index, mask_mod=mod)


def _from_elements(seq_lens, block_size, bm, hm, rows, mod):
    """A mask from element values: ``rows(q0, q1)`` gives bool [Bm, Hm, q1 - q0, Nk]."""
    nq, nk = seq_lens
    bq, bk = block_size
    nqb, nkb = _cdiv(nq, bq), _cdiv(nk, bk)
    full = torch.zeros(bm, hm, nqb, nkb, dtype=torch.bool)
    partial = torch.zeros_like(full)
    step = max(1, _CHUNK_ELEMENTS // max(1, bm * hm * nk * bq)) * bq
    kpad = nkb * bk - nk
    # Out-of-bounds elements count as allowed for "full" and not allowed for "any".
    for q0 in range(0, nq, step):
        q1 = min(nq, q0 + step)
        x = rows(q0, q1)
        if x.shape != (bm, hm, q1 - q0, nk):
            x = x.expand(bm, hm, q1 - q0, nk)
        qpad = _cdiv(q1 - q0, bq) * bq - (q1 - q0)
        cnt = torch.nn.functional.pad(x.to(torch.int32), (0, kpad, 0, qpad))
        area = torch.nn.functional.pad(torch.ones(q1 - q0, nk, dtype=torch.int32),
                                       (0, kpad, 0, qpad))
        nb = cnt.shape[2] // bq
        cnt = cnt.view(bm, hm, nb, bq, nkb, bk).sum((3, 5))
        area = area.view(nb, bq, nkb, bk).sum((1, 3))
        qb0 = q0 // bq
        full[:, :, qb0:qb0 + nb] = cnt == area
        partial[:, :, qb0:qb0 + nb] = (cnt > 0) & (cnt < area)
    return _with_bits(seq_lens, block_size, full, partial, mod)


def _from_rule(seq_lens, block_size, rule):
    nq, nk = seq_lens
    full, any_ = rule.classify(nq, nk, *block_size)
    mask = BlockMask(seq_lens, block_size, full.contiguous(), (any_ & ~full).contiguous(), rule)
    return mask


def _doc_ids(op, name, ids, n=None):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of document ids; got "
                        f"{type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise DTypeError(f"{op}: {name} must be an integer tensor; got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ShapeError(f"{op}: {name} must be [N] or [B, N] with N >= 1; got shape "
                         f"{tuple(ids.shape)}")
    if n is not None and ids.shape[1] != n:
        raise ShapeError(f"{op}: {name} must have {n} positions; got {ids.shape[1]}")
    # int64 holds every integer dtype's ids exactly but uint64's, which it maps one to one.
    return ids.to(torch.int64).cpu().contiguous()


def _int32_doc_ids(q_doc, kv_doc):
    """The int64 ids [B, Nq], [B, Nk] as int32, as the kernels read them: the same values when
    all fit, else their ranks among the distinct ids of both (equal ids stay equal, distinct
    ids distinct, order kept), so ids such as 0 and 2**32 never land in one document."""
    tensors = (q_doc,) if kv_doc is q_doc else (q_doc, kv_doc)
    if all(-(2**31) <= t.min() and t.max() < 2**31 for t in tensors):
        q32 = q_doc.to(torch.int32)
        return q32, q32 if kv_doc is q_doc else kv_doc.to(torch.int32)
    ranks = torch.unique(torch.cat([t.reshape(-1) for t in tensors]), return_inverse=True)[1]
    ranks = ranks.to(torch.int32)
    q32 = ranks[:q_doc.numel()].view(q_doc.shape)
    return q32, q32 if kv_doc is q_doc else ranks[q_doc.numel():].view(kv_doc.shape)
