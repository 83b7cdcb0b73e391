"""RISE: Readout Influence Sketching Estimator.

Training-data attribution and valuation for causal language models from the LM head
alone.  The package is the domain core (readout, sketches, index, scoring) that the CLI,
the Celery workers and the gRPC services all call.

Front door::

    from rise import api
    api.create(...), api.attribute(...), api.value(...)
"""

__version__ = "0.1.0"
