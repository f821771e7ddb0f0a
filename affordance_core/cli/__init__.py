"""Console scripts of affordance_core (``affordance-synth``, ``affordance-train``, ...)."""
