"""Weight-only quantization (int8, blockwise, NF4, QLoRA double quantization) and number formats.

    from gptlab.quant import quantize_model, save_quantized, load_quantized
    quantize_model(model, "nf4")            # Linear layers -> QuantLinear, lm_head kept
    save_quantized("runs/q", model, tok)    # packed safetensors + quantization_config.json
"""

from gptlab.quant.checkpoint import QCONFIG, is_quantized_checkpoint, load_quantized, save_quantized
from gptlab.quant.compare import ALL_FORMATS, compare_formats, format_comparison, mean_nll, time_forward
from gptlab.quant.formats import (DEFAULT_BLOCK, FORMATS, NF4_CODE, QuantizedTensor, bits_per_weight,
                                  dequantize, nf4_code_from_normal, quantize)
from gptlab.quant.linear import (DEFAULT_SKIP, QuantEmbedding, QuantLinear, dequantize_model, quant_modules,
                                 quantize_model)
from gptlab.quant.precision import (PRECISIONS, cast_model, format_info, format_precision, model_bytes,
                                    parse_precision, roundtrip_errors)

__all__ = [
    "ALL_FORMATS", "DEFAULT_BLOCK", "DEFAULT_SKIP", "FORMATS", "NF4_CODE", "PRECISIONS", "QCONFIG",
    "QuantEmbedding", "QuantLinear", "QuantizedTensor", "bits_per_weight", "cast_model", "compare_formats",
    "dequantize", "dequantize_model", "format_comparison", "format_info", "format_precision", "is_quantized_checkpoint",
    "load_quantized", "mean_nll", "model_bytes", "nf4_code_from_normal", "parse_precision",
    "quant_modules", "quantize", "quantize_model", "roundtrip_errors", "save_quantized", "time_forward",
]
