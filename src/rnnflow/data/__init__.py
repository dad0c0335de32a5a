"""The data phase, stages prepare, tokenize and pack: sources and downloads, cleaning and
splits, tokenizers (torch-free), packed arrays and their length-bucketed batches. May import
core and runtime."""
