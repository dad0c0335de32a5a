"""DVC stage export@VARIANT: best checkpoint -> ONNX bundle in models/VARIANT/."""

from rnnflow.export import export_bundle
from rnnflow.stagecli import variant_stage

if __name__ == "__main__":
    variant_stage("export", export_bundle, __doc__)
