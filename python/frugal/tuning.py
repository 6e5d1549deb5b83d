"""Tuning data: which implementation and launch config ``auto`` uses on this device.

``preferred(op, device, args, kwargs)`` is the registry's question: the backend the tuning file
of this device names as the fastest verified one for such a call, or None (no data: the op's
default order applies)."""


def preferred(op, device, args, kwargs):
    """The tuned choice for ``op`` on ``device`` for these arguments, or None."""
    return None
