"""Quantization: LSQ+ quantization-aware training and ONNX export of FP32 and INT8 (QDQ) models."""
