"""Fuzzing the gateway with bad input (issue "Security, fairness and bad input").

- ``strategies``: Hypothesis strategies built by walking the rise.v1 request descriptors,
  generated dataset files, unknown fields and malformed bytes.
- ``hints``: values that mean something to the service, per request field.
- ``oracle``: the codes ``docs/bad-input.md`` allows for a request, and the job ends.
- ``run``: the run against the local stack (``python -m tests.fuzz.run [--quick]``,
  ``make fuzz``) and its report (``fuzz.json``, ``fuzz.md``).
- ``test_fuzz_strategies``: the strategies and the oracle's dataset rules against
  ``rise.data``, without servers; ``test_fuzz_quick``: the quick run, for CI.
"""
