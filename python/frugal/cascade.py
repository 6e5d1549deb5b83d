"""Shared-prefix (cascade) decode over a paged cache: which sequences share which leading
blocks (:func:`cascade_groups`), and the decode that reads a group's shared blocks once
(:class:`CascadeDecode`). :class:`frugal.PagedKVCache` uses both in its decode
(``attention`` and ``plan``); the ops themselves are the ordinary paged decode and
:func:`frugal.merge_attention_states`.

Sequences forked from one prompt, or matched to one cached prefix, reference the same physical
blocks for that prefix. Per-sequence decode reads those blocks once per sequence; cascade
decode reads them once per group, in three steps:

1. *Prefix pass.* A group of n sequences shares its first P = k * block_size tokens (k whole
   blocks, the same block ids in every member's table). The members' queries [n, Hq, D] are
   folded into the head dim, kv-head-major: folded head ``h * n * G + i * G + g`` is query
   head ``h * G + g`` of member i (G = Hq / Hkv), so the op's GQA rule (query head j reads kv
   head ``j // (n * G)``) gives it kv head h. One decode call with the prefix blocks as its
   table and seq_len P attends them, returning lse. Groups of the same size share that call,
   one batch row per group.
2. *Suffix pass.* One decode call over every sequence, its table row offset by its group's k
   blocks and its seq_len by P (a sequence in no group keeps its row and length), with lse.
3. *Merge.* :func:`frugal.merge_attention_states` of the two passes, per group member. A
   suffix of length 0 has lse -inf and passes the prefix pass through unchanged.

Score modifiers (:mod:`frugal.score_mods`) pass through both: a softcap as it is; ALiBi slopes
[B, Hq] follow the queries (folded with them in the prefix pass). The suffix pass shifts a
member's query and keys by P alike, so its distances are its own. The prefix pass puts every
member's query at P - 1 where it is at P + s - 1 (s its suffix length): each of its scores is
lower by slope * s in truth, a constant per row, so its out is right and its lse is lowered by
slope * s before the merge.

Both passes run the decode implementation the caller chose (any backend), without windows:
a window that cuts into a sequence changes what each member reads, so such a decode runs per
sequence (PagedKVCache refuses ``cascade=True`` there); a window that covers every sequence
changes nothing.

Cost rule. The FLOPs are those of per-sequence decode; what changes is bytes: a group saves
(n - 1) * P token reads of K and V per layer, for the price of one more decode call per
distinct group size and a merge over the members' rows (on CPU tensors one C++ call,
``frugal::merge_attention_states_``, in place with row indices). A group is used when its
saving is at least ``MIN_SAVED_BYTES`` per layer (:func:`min_saved_tokens` in a cache's
tokens) and its shared prefix holds at least ``MIN_PREFIX_BYTES`` (:func:`min_prefix_tokens`);
below that the extra calls cost about what they save. Groups are chosen to save many reads: the sequences' table rows form a trie of block
ids; at each node a subtree forms its own groups deeper when that saves more than its members
would add to one group over the node's common blocks, and the node's group is kept when it
saves more than handing every subtree down (greedy per node, not an exhaustive search).
"""

import os

import torch

from . import _ext
from .merge_attention_states import MERGE_ATTENTION_STATES

# The C++ in-place merge with row indices (csrc/cpu/merge_states.cpp): one call, on the calling
# thread for a decode's rows, where a dozen small PyTorch ops each open a parallel region.
_CPU_MERGE = (torch.ops.frugal.merge_attention_states_
              if _ext.ext() is not None and hasattr(torch.ops.frugal, "merge_attention_states_")
              else None)

# A group runs as a cascade only if it saves at least this many bytes of K and V reads per
# layer ((n - 1) * P tokens of 2 * Hkv * D elements, with their int8 scales). The cascade's
# extra work -- one more decode call per group size, the folded queries, a merge over the
# members' rows -- costs a fixed amount per call. Measured on this 2-core CPU, one thread,
# float32, Hq 32, Hkv 8, D 128, interleaved pairs: 2 sequences sharing 256 tokens (2 MiB
# saved) 1.01x, 1024 (8 MiB) 1.08x, 4096 1.47x; 32 sharing 128 (31 MiB) 1.12x.
MIN_SAVED_BYTES = 4 << 20
# ... and only if its shared prefix holds at least this many bytes of K and V per layer: a
# shorter prefix pass is too little work for its call's fixed cost (two threads, Hkv 8: 32
# sequences sharing 128 tokens, 1 MiB, measured 0.5-0.9x; sharing 256 tokens 1.02x).
MIN_PREFIX_BYTES = 2 << 20


def token_bytes(cache):
    """Bytes of K and V (and their int8 scales) one token of one layer of ``cache`` holds."""
    item = cache.k_cache.element_size() + (4 if cache.k_scale is not None else 0) / cache.head_dim
    return int(2 * cache.num_kv_heads * cache.head_dim * item)


def min_prefix_tokens(cache):
    """The "auto" rule's least shared prefix for ``cache``: :data:`MIN_PREFIX_BYTES` in its
    tokens."""
    return -(-MIN_PREFIX_BYTES // token_bytes(cache))


def min_saved_tokens(cache):
    """The "auto" rule for ``cache``: the least ``(n - 1) * P`` token reads a group must save,
    :data:`MIN_SAVED_BYTES` in tokens of this cache."""
    return -(-MIN_SAVED_BYTES // token_bytes(cache))


def _full_blocks(row, length, block_size):
    """Leading blocks of ``row`` that are whole (every position written) and present."""
    k = min(length // block_size, len(row))
    try:
        return min(k, row.index(-1))
    except ValueError:
        return k


def cascade_groups(rows, lens, block_size, min_saved=1, min_prefix=1):
    """The shared-prefix groups of a decode batch.

    Parameters
    ----------
    rows : list of lists of block ids, one table row per sequence (-1: no block).
    lens : list of ints, the tokens each sequence attends to.
    block_size : int.
    min_saved : int, the least ``(n - 1) * P`` token reads a group must save.
    min_prefix : int, the fewest shared tokens P a group may have.

    Returns
    -------
    list of (members, k): ``members`` a tuple of >= 2 batch indices whose rows start with the
    same k >= 1 whole blocks (P = k * block_size tokens, within every member's length). A
    sequence is in at most one group. The grouping saves the most token reads the trie of
    rows allows (see the module docstring).
    """
    full = [_full_blocks(list(r), n, block_size) for r, n in zip(rows, lens)]
    rows = [list(r[:f]) for r, f in zip(rows, full)]

    def visit(members, depth):
        # members share rows[:depth]: extend the common run to `depth` blocks, then decide
        # which members group here (over `depth` blocks) and which subtrees group deeper.
        cap = min(full[i] for i in members)
        depth += len(os.path.commonprefix([rows[i][depth:cap] for i in members]))
        children = {}
        for i in members:
            if full[i] > depth:
                children.setdefault(rows[i][depth], []).append(i)
        here, deeper, deeper_saved = [i for i in members if full[i] == depth], [], 0
        everything_deeper = (0, [])
        for child in children.values():
            s, g = visit(child, depth + 1) if len(child) > 1 else (0, [])
            everything_deeper = (everything_deeper[0] + s, everything_deeper[1] + g)
            # A subtree groups deeper when that saves more than its members would add to a
            # group here (depth blocks each).
            if s > len(child) * depth * block_size:
                deeper, deeper_saved = deeper + g, deeper_saved + s
            else:
                here += child
        saved_here = (len(here) - 1) * depth * block_size
        mixed = (saved_here + deeper_saved, [(tuple(sorted(here)), depth)] + deeper) if (
            depth > 0 and len(here) > 1 and saved_here >= min_saved
            and depth * block_size >= min_prefix) else (0, [])
        return mixed if mixed[0] > everything_deeper[0] else everything_deeper

    return visit(list(range(len(rows))), 0)[1] if len(rows) > 1 else []


class _Bucket:
    """Groups of one size n, prefix pass in one call: member indices (group by group), the
    groups' prefix tables and lengths."""

    def __init__(self, size, groups, rows, block_size, device):
        self.size = size
        self.count = len(groups)
        self.index = torch.tensor([i for members, _ in groups for i in members],
                                  dtype=torch.long).to(device)
        width = max(k for _, k in groups)
        table = [rows[members[0]][:k] + [-1] * (width - k) for members, k in groups]
        self.tables = torch.tensor(table, dtype=torch.int32).to(device)
        lens = [k * block_size for _, k in groups]
        self.lens = torch.tensor(lens, dtype=torch.int32).to(device)
        self.max_len = max(lens)
        self._rows = {}

    def fold_rows(self, hq, hkv):
        """int64 [count * hq * size]: row ``members[i] * hq + h * G + g`` of the batch's q
        [B * Hq, D] for folded head ``h * size * G + i * G + g`` of each group, group by group
        (built on the first layer, then reused)."""
        key = (hq, hkv)
        if key not in self._rows:
            g = hq // hkv
            members = self.index.view(self.count, 1, self.size, 1)
            heads = (torch.arange(hkv, device=self.index.device).view(1, hkv, 1, 1) * g
                     + torch.arange(g, device=self.index.device).view(1, 1, 1, g))
            self._rows[key] = (members * hq + heads).reshape(-1)
        return self._rows[key]


class CascadeDecode:
    """The device tensors of one cascade decode, built once on the host (a plan's every layer
    reuses them): suffix tables and lengths of the whole batch, and one bucket of prefix
    tables per group size.

    Parameters
    ----------
    groups : list of (members, k) from :func:`cascade_groups` (at least one).
    rows, lens : the batch's table rows (lists of block ids) and lengths.
    block_size : int.
    device : where the tensors go (the cache's device).

    Attributes
    ----------
    groups : tuple of (members, prefix_tokens).
    """

    def __init__(self, groups, rows, lens, block_size, device):
        rows = [list(r) for r in rows]
        offset = [0] * len(rows)
        for members, k in groups:
            for i in members:
                offset[i] = k
        suffix = [r[k:] for r, k in zip(rows, offset)]
        width = max((len(r) for r in suffix), default=0)
        self.suffix_tables = torch.tensor([r + [-1] * (width - len(r)) for r in suffix],
                                          dtype=torch.int32).reshape(len(rows), width).to(device)
        suffix_lens = [n - k * block_size for n, k in zip(lens, offset)]
        self.suffix_lens = torch.tensor(suffix_lens, dtype=torch.int32).to(device)
        self.max_suffix_len = max(suffix_lens, default=0)
        by_size = {}
        for members, k in groups:
            by_size.setdefault(len(members), []).append((members, k))
        self.buckets = [_Bucket(n, g, rows, block_size, device) for n, g in by_size.items()]
        self.groups = tuple((tuple(m), k * block_size) for m, k in groups)
        self._merge = MERGE_ATTENTION_STATES.select(torch.device(device), "auto", None, None,
                                                    None, None)

    def run(self, impl, q, k_cache, v_cache, scale, k_scale, v_scale, workspace=None, *,
            softcap=0.0, alibi_slopes=None):
        """Decode of q [B, Hq, D] (float scale; no window) with the decode implementation
        ``impl`` (a :class:`frugal.registry.Impl`): (out [B, Hq, D] in q's dtype, lse float32
        [B, Hq]). ``workspace(tag, q, tables, max_seq_len)`` gives each pass its split-KV
        buffers (or None). ``softcap`` (0.0: none) and ``alibi_slopes`` (float32 [B, Hq] or
        None) modify the scores, each query at its own sequence's last position (see the
        module docstring)."""
        def ws(tag, x, tables, max_len):
            return None if workspace is None else workspace(tag, x, tables, max_len)

        B, Hq, D = q.shape
        hkv = k_cache.shape[2]
        # Positions in the suffix pass are offset by P for the query and its keys alike: the
        # ALiBi distances stay the same.
        out, lse = impl.run(q, k_cache, v_cache, self.suffix_tables, self.suffix_lens, scale, 0,
                            k_scale, v_scale, self.max_suffix_len,
                            ws("suffix", q, self.suffix_tables, self.max_suffix_len),
                            return_lse=True, softcap=softcap, alibi_slopes=alibi_slopes)
        out, lse = out.contiguous(), lse.contiguous()
        out_rows, lse_rows = out.view(B * Hq, D), lse.view(B * Hq)
        q_rows = q.reshape(B * Hq, D)
        if alibi_slopes is not None:
            slope_rows = alibi_slopes.reshape(B * Hq)
            # A member's query is P + suffix_len - 1: its suffix length farther from every
            # prefix key than the prefix pass's query at P - 1.
            shift_rows = self.suffix_lens.repeat_interleave(Hq).to(torch.float32)
        for bucket in self.buckets:
            rows = bucket.fold_rows(Hq, hkv)
            folded = q_rows.index_select(0, rows).view(bucket.count, -1, D)
            slopes = (None if alibi_slopes is None
                      else slope_rows.index_select(0, rows).view(bucket.count, -1))
            o, s = impl.run(folded, k_cache, v_cache, bucket.tables, bucket.lens, scale, 0,
                            k_scale, v_scale, bucket.max_len,
                            ws(f"prefix{bucket.size}", folded, bucket.tables, bucket.max_len),
                            return_lse=True, softcap=softcap, alibi_slopes=slopes)
            o, s = o.reshape(-1, D), s.reshape(-1)
            if slopes is not None:
                # ALiBi after the cap: each prefix score is lower by slope * suffix_len, a
                # constant per row, which leaves o as it is and lowers its lse by as much.
                s = s - slopes.reshape(-1) * shift_rows.index_select(0, rows)
            if out.device.type == "cpu" and _CPU_MERGE is not None:
                # In place, row rows[i] of the suffix state with row i of the prefix state.
                _CPU_MERGE(out_rows, lse_rows, o, s, rows, None)
            else:
                mo, ms = self._merge.run(out_rows.index_select(0, rows),
                                         lse_rows.index_select(0, rows), o, s)
                out_rows.index_copy_(0, rows, mo)
                lse_rows.index_copy_(0, rows, ms)
        return out, lse
