"""DVC stage gradients@VARIANT: checkpoint -> metrics/gradients/VARIANT.json (dL/dh_t per step)."""

from rnnflow.analysis.gradients import gradient_flow
from rnnflow.runtime.stagecli import variant_stage

if __name__ == "__main__":
    variant_stage("gradients", gradient_flow, __doc__)
