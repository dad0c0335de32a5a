"""rnnflow: train, compare and ship recurrent text classifiers."""

__version__ = "0.1.0"
