"""Keep the Hugging Face libraries' console output to what a flowtune user needs.

transformers and diffusers log import-time notices and show a progress bar for every component
they load or save; flowtune prints its own progress, so these are turned down.  Explicit user
settings of the same environment variables win.

torchao (``model.quantize``), which diffusers imports whenever it is installed, logs a warning for
each of its optional compiled kernels that this torch build cannot load (all of them on a CPU
build; flowtune's configs run without them), and its import makes torch's pytree logger warn
about an Enum registration: both are turned down to errors.
"""

from __future__ import annotations

import logging
import os
import sys

# Loggers that warn on import about things a flowtune user cannot act on.
_IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_libraries() -> None:
    """Lower transformers/diffusers verbosity to errors and hide their loading progress bars.

    Cheap (imports nothing).  The verbosity is read when those libraries are imported, so call it
    early; call it again after importing them to switch off their progress bars too.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in _IMPORT_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module = sys.modules.get(name)
        if module is not None:
            module.disable_progress_bar()
