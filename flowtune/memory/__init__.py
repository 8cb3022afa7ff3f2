"""Memory savers: quantization of the frozen base (``model.quantize``)."""
