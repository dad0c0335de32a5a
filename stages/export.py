"""DVC stage export@VARIANT: best checkpoint -> ONNX bundle in models/VARIANT/."""

from rnnflow.runtime.stagecli import variant_stage
from rnnflow.shipping.export import export_bundle

if __name__ == "__main__":
    variant_stage("export", export_bundle, __doc__)
