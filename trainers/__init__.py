"""difftune's library: the recipe schema, the one training loop, objectives and backbones."""
import logging

# bitsandbytes (which peft imports) warns on CPUs with AVX512-BF16 that an optional kernel from the hub is missing;
# its built-in fallback is correct, and the warning would otherwise open every CPU run's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage())
