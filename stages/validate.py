"""DVC stage validate@VARIANT: onnxruntime vs PyTorch parity gate on the bundle."""

from rnnflow.runtime.stagecli import variant_stage
from rnnflow.shipping.validate import validate_bundle

if __name__ == "__main__":
    variant_stage("validate", validate_bundle, __doc__)
