"""Stage train@VARIANT: the one training loop, several processes (distributed) and CUDA
graphs of its steps (graphs). May import core, runtime, tracking, data and model."""
