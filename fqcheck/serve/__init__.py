"""Serve conformance: the tensor contract of real-quantized checkpoints as vLLM 0.33 loads them.

config.py resolves the quantization config vLLM will use (and what it refuses: SRV001), match.py
decides per module whether the loader builds it quantized, formats.py says which tensors each
format's quantized module carries. The SRV checks (fqcheck/checks/srv.py) compare that with the
safetensors headers. Contract and sources: shared/reference/serve-conformance.md."""
