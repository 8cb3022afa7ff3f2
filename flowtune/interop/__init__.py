"""LoRA interoperability: flowtune's LoRAs in the layouts other tools load, or merged in.

- :mod:`flowtune.interop.export`: ``flowtune export`` (:func:`export_lora`, :func:`merge_lora`).
- :mod:`flowtune.interop.lora`: reading a flowtune LoRA file and converting it to the
  ``kohya`` / ``comfyui`` layouts (fused modules, ``alpha`` tensors), family-independent.
- :mod:`flowtune.interop.naming`: how a family describes its original module names.
- each family's diffusers -> original (BFL) names, ``FamilySpec.lora_original_names``, live in its
  package: ``flowtune/families/<name>/naming.py``.

Nothing here imports torch or diffusers at import time; the functions do.
"""

from flowtune.interop.export import ExportResult, export, export_lora, merge_lora
from flowtune.interop.naming import OriginalNaming, OriginalSlot

__all__ = ["ExportResult", "OriginalNaming", "OriginalSlot", "export", "export_lora", "merge_lora"]
