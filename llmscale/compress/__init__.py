"""Model compression: quantization, pruning, distillation and their evaluation."""
