"""What users run beside the pipeline: benchmarks (bench, scaling), the pipeline's profile,
the load test, the GPU check and the install check. The top floor: may import every room."""
