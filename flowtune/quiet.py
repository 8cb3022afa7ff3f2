"""Keep the Hugging Face libraries' console output to what a flowtune user needs.

transformers and diffusers log import-time notices and show a progress bar for every component
they load or save; flowtune prints its own progress, so these are turned down.  Explicit user
settings of the same environment variables win.
"""

from __future__ import annotations

import os
import sys


def quiet_libraries() -> None:
    """Lower transformers/diffusers verbosity to errors and hide their loading progress bars.

    Cheap (imports nothing).  The verbosity is read when those libraries are imported, so call it
    early; call it again after importing them to switch off their progress bars too.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module = sys.modules.get(name)
        if module is not None:
            module.disable_progress_bar()
