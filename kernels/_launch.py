"""Host-side helpers the Triton launchers share: the device's config-file key and SM count,
every device file the launchers may read, head-dim blocks and stride alignment."""

import contextlib
import functools

import torch
import triton
from torch.library import wrap_triton

from . import configs

DEFAULT_SMS = 132  # H100 SXM: the SM count split heuristics assume off a GPU (the interpreter)
ALIGN = 16  # elements: strides the kernels' vectorized loads assume


def device_key(device):
    """(GPU name, arch) the launch configs of ``device`` are filed under (``configs.pick``):
    e.g. ("NVIDIA H100 80GB HBM3", "sm_90"); (None, None) off a GPU (default.json)."""
    if device.type != "cuda":
        return None, None
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def _cuda_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device):
    """Streaming multiprocessors of ``device`` (DEFAULT_SMS off a GPU)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SMS


def device_files():
    """None (no GPU-specific file) and the device name of every GPU-specific config file."""
    return [None, *configs.device_names()]


def head_block(D):
    """BLOCK_D of head dim D: a power of two >= 32 (D = 96 runs in a masked 128)."""
    return max(32, triton.next_power_of_2(D))


def aligned_strides(t, dims, align=ALIGN):
    return all(t.stride(i) % align == 0 for i in dims if t.shape[i] > 1)


def aligned(t, align=ALIGN):
    """t [..., D] with unit stride in D and every other stride a multiple of ``align`` elements
    (a copy when it is not); D itself is a multiple of ``align``."""
    if (t.shape[-1] <= 1 or t.stride(-1) == 1) and aligned_strides(t, range(t.dim() - 1), align):
        return t
    return t.contiguous()


def launch(kernel, grid, device):
    """``kernel[grid]`` as the launchers call it: through ``wrap_triton`` (so torch.compile sees
    into the kernel) and on ``device``'s GPU and current stream, whatever device is current
    (Triton launches on the current device: tensors on cuda:1 while cuda:0 is current would
    run on the wrong GPU and stream)."""
    run = wrap_triton(kernel)[grid]

    def call(*args, **kwargs):
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return run(*args, **kwargs)

    return call
