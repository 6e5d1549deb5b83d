"""Launch configs as data: one JSON file per GPU name, plus ``default.json``.

A file maps a kernel name to a list of buckets ``{"max_<dim>": int | null, ...config}`` sorted by
the bucket bound; the first bucket whose bound admits the shape wins (null admits everything).
A GPU's own file (``NVIDIA_H100_80GB_HBM3.json``: the device name with spaces as underscores)
overrides ``default.json`` kernel by kernel.
"""

import functools
import json
import os

_DIR = os.path.dirname(os.path.abspath(__file__))


def file_for(device_name):
    return os.path.join(_DIR, device_name.replace(" ", "_").replace("/", "_") + ".json")


@functools.lru_cache(maxsize=None)
def _read(path):
    with open(path) as f:
        return json.load(f)


def buckets(kernel, device_name=None):
    """The buckets of ``kernel`` for a device (its own file when present, else the default)."""
    if device_name is not None and os.path.exists(file_for(device_name)):
        table = _read(file_for(device_name))
        if kernel in table:
            return table[kernel]
    return _read(os.path.join(_DIR, "default.json"))[kernel]


def pick(kernel, dim, value, device_name=None):
    """The config of the first bucket whose ``max_<dim>`` bound admits ``value``."""
    key = "max_" + dim
    for bucket in buckets(kernel, device_name):
        bound = bucket.get(key)
        if bound is None or value <= bound:
            return {k: v for k, v in bucket.items() if k != key}
    raise LookupError(f"configs for {kernel}: no bucket admits {dim}={value}")


def all_configs(kernel):
    """Every distinct config of ``kernel`` in every file: what the launcher may ever pick."""
    seen = []
    for name in sorted(os.listdir(_DIR)):
        if not name.endswith(".json"):
            continue
        for bucket in _read(os.path.join(_DIR, name)).get(kernel, []):
            cfg = {k: v for k, v in bucket.items() if not k.startswith("max_")}
            if cfg not in seen:
                seen.append(cfg)
    return seen
