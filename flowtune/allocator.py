"""The CUDA caching allocator's setting for flowtune's commands: expandable segments.

A training run changes the shapes of its activations from step to step (each resolution bucket,
clip length and caption length has its own), and block offload and validation free and allocate
large buffers between steps.  PyTorch's default caching allocator keeps fixed-size segments: the
freed blocks of one shape rarely fit the next, so the memory it reserves grows past what the
tensors need until an allocation fails with gigabytes "reserved but unallocated" (torch's own
out-of-memory message then suggests this setting).  With ``expandable_segments:True`` a segment
grows and shrinks in place (CUDA virtual memory), so what it reserves stays close to what is
allocated, which is what ``flowtune plan`` predicts.

It is set for the command's process and the processes it launches, before torch is imported,
unless the user set the allocator themselves (``PYTORCH_ALLOC_CONF`` or its older name
``PYTORCH_CUDA_ALLOC_CONF``): their setting is kept as it is.  It does nothing without CUDA.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
"""The environment variables PyTorch reads its allocator settings from (new name, old name)."""

DEFAULT_ALLOCATOR_CONF = "expandable_segments:True"


def configure_allocator(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set ``PYTORCH_ALLOC_CONF=expandable_segments:True`` in ``environ`` unless either allocator
    variable is set already; True when it was set here.  Call it before torch is imported: the
    processes a command starts inherit it."""
    if any(environ.get(name) for name in ALLOCATOR_VARIABLES):
        return False
    environ[ALLOCATOR_VARIABLES[0]] = DEFAULT_ALLOCATOR_CONF
    return True
