"""DVC stage evaluate@VARIANT: best checkpoint + test split -> metrics/eval/VARIANT.json + plot."""

from rnnflow.analysis.evaluate import evaluate_variant
from rnnflow.runtime.stagecli import variant_stage

if __name__ == "__main__":
    variant_stage("evaluate", evaluate_variant, __doc__)
