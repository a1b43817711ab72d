"""Export of trained ensembles to ONNX (imports torch and onnx)."""
