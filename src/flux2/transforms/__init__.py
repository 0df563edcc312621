"""Speed, memory and adapter changes, each a function applied to a built model or pipeline.

`model.py` stays the plain transformer and `pipeline.py` the plain wiring: a transform changes a built object
(its modules, or the hooks every pipeline stage runs in) and never adds a branch to them.

- `offload.cpu_offload(pipe)`: models live on the CPU and visit the device only for the stages that use them.
- `lora.set_loras(model, [(lora, strength), ...])`: LoRAs applied unfused by forward hooks (or `fuse_loras`).
- `quantized.quantize_linears(model, weights)`: Linears become weight-only `QuantizedLinear`s (fp8, nvfp4, GGUF).
"""
