"""Host-side helpers the Triton launchers share: the device's config-file name and SM count,
every config file the launchers may read, head-dim blocks and stride alignment."""

import functools
import os

import torch
import triton

from . import configs

DEFAULT_SMS = 132  # H100 SXM: the SM count split heuristics assume off a GPU (the interpreter)
ALIGN = 16  # elements: strides the kernels' vectorized loads assume


def device_name(device):
    """The name configs are filed under for ``device`` (None off a GPU: default.json)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _cuda_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device):
    """Streaming multiprocessors of ``device`` (DEFAULT_SMS off a GPU)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SMS


def device_files():
    """None (default.json) and the device name of every GPU-specific config file."""
    names = sorted(f[:-5] for f in os.listdir(os.path.dirname(configs.__file__))
                   if f.endswith(".json") and f != "default.json")
    return [None, *names]


def head_block(D):
    """BLOCK_D of head dim D: a power of two >= 32 (D = 96 runs in a masked 128)."""
    return max(32, triton.next_power_of_2(D))


def aligned_strides(t, dims):
    return all(t.stride(i) % ALIGN == 0 for i in dims if t.shape[i] > 1)


def aligned(t):
    """t [..., D] with unit stride in D and every other stride a multiple of 16 elements (a
    copy when it is not); D itself is a multiple of 16."""
    if (t.shape[-1] <= 1 or t.stride(-1) == 1) and aligned_strides(t, range(t.dim() - 1)):
        return t
    return t.contiguous()
