"""DVC stage train@VARIANT: packed splits -> best checkpoint + training metrics."""

from rnnflow.runtime.stagecli import variant_stage
from rnnflow.training.train import train_variant

if __name__ == "__main__":
    variant_stage("train", train_variant, __doc__)
