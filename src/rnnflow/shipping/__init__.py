"""The model leaves Python: ONNX export, the parity gate (validate), the torch-free predictor
and command line, and the raw-text MLflow model (serving). May import core, runtime,
tracking, data and model; predict, serving and their imports stay free of torch."""
