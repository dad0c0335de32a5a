"""DVC stage train@VARIANT: packed splits -> best checkpoint + training metrics."""

from rnnflow.stagecli import variant_stage
from rnnflow.train import train_variant

if __name__ == "__main__":
    variant_stage("train", train_variant, __doc__)
