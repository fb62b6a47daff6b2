"""Serving many adapters on one base model (issue in progress): batched LoRA kernels so far."""
