"""DVC stage validate@VARIANT: onnxruntime vs PyTorch parity gate on the bundle."""

from rnnflow.stagecli import variant_stage
from rnnflow.validate import validate_bundle

if __name__ == "__main__":
    variant_stage("validate", validate_bundle, __doc__)
