"""Every forward pass of a test worker takes ``TEST_BATCH_SLEEP_S`` seconds longer, as a
large model's would: imported by a test worker with ``celery worker -I slow_batches``
(before the pool forks, so its children inherit it), never by the product."""

from __future__ import annotations

import os
import time

from rise.model import LoadedModel

SLEEP_S = float(os.environ.get("TEST_BATCH_SLEEP_S", "0.5"))
_hidden_states = LoadedModel.hidden_states


def slow_hidden_states(self: LoadedModel, input_ids, attention_mask):
    time.sleep(SLEEP_S)
    return _hidden_states(self, input_ids, attention_mask)


LoadedModel.hidden_states = slow_hidden_states  # type: ignore[method-assign]
