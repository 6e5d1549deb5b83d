"""Launch configs as data: ``default.json``, one file per GPU architecture (``sm_90.json``:
every GPU of compute capability 9.0), one per GPU name, and the user's tuned file
(``frugal tune``), which comes first.

A file maps a kernel name to a list of buckets ``{"max_<dim>": int | null, ...config}`` sorted by
the bucket bound; the first bucket whose bound admits the shape wins (null admits everything).
For a device keyed (name, arch) -- see ``frugal.kernels._launch.device_key`` -- a table is read
from the GPU's own file (``NVIDIA_H100_80GB_HBM3.json``: the name with spaces as underscores),
else its architecture's file, else ``default.json``, kernel by kernel.
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


def _is_arch(name):
    return name.startswith("sm_") and name[3:].isdigit()


def device_names():
    """The GPU names that have a file of their own."""
    return sorted(f[:-5] for f in os.listdir(_DIR) if f.endswith(".json")
                  and f not in ("default.json", "space.json") and not _is_arch(f[:-5]))


_TUNED = {"tables": None, "path": None}  # the tuned file in force (frugal.tuning installs it)


def set_tuned(tables, path):
    """Install the launch-config tables of a tuned file (``frugal tune``); None removes them.
    They come before every shipped file."""
    _TUNED["tables"], _TUNED["path"] = tables, path


def source(kernel, key=None):
    """Which file ``kernel``'s configs come from for a device ``key``."""
    if _TUNED["tables"] and kernel in _TUNED["tables"]:
        return _TUNED["path"]
    name, arch = key if key is not None else (None, None)
    for filed in (name, arch):
        if filed is not None and os.path.exists(file_for(filed)):
            if kernel in _read(file_for(filed)):
                return file_for(filed)
    return os.path.join(_DIR, "default.json")


def table_dim(kernel):
    """The dimension ``kernel``'s buckets are keyed on ("M", "D", "K")."""
    for key in _read(os.path.join(_DIR, "default.json"))[kernel][0]:
        if key.startswith("max_"):
            return key[4:]
    raise LookupError(f"configs for {kernel}: no max_<dim> key")


def buckets(kernel, key=None):
    """The buckets of ``kernel`` for a device ``key`` = (GPU name, arch) (or None): the tuned
    file's when it has the table, else the GPU's own file, else its arch's, else the
    default."""
    if _TUNED["tables"] and kernel in _TUNED["tables"]:
        return _TUNED["tables"][kernel]
    name, arch = key if key is not None else (None, None)
    for filed in (name, arch):
        if filed is not None and os.path.exists(file_for(filed)):
            table = _read(file_for(filed))
            if kernel in table:
                return table[kernel]
    return _read(os.path.join(_DIR, "default.json"))[kernel]


def pick(kernel, dim, value, key=None):
    """The config of the first bucket whose ``max_<dim>`` bound admits ``value``."""
    bound_key = "max_" + dim
    for bucket in buckets(kernel, key):
        bound = bucket.get(bound_key)
        if bound is None or value <= bound:
            return {k: v for k, v in bucket.items() if k != bound_key}
    raise LookupError(f"configs for {kernel}: no bucket admits {dim}={value}")


def space(kernel, quick=False):
    """The search space of ``kernel`` (``space.json``): every combination of its values, in a
    fixed order; [] for a table without one."""
    import itertools

    entry = _read(os.path.join(_DIR, "space.json")).get(kernel)
    if entry is None:
        return []
    grid = entry["quick" if quick else "full"]
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
