"""Model optimizer: export to ONNX, convert to int8/fp16/bf16 on ONNX Runtime, and a precision doctor
that keeps just the nodes that must stay FP32 to meet a tolerance."""
