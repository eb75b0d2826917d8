"""Record and config keys of Flower's message convention, defined once for every tinyfleet module.

Flower's stock strategies (FedAvg, FedProx, ...) put the model under "arrays" and
the round's settings under "config", and read "num-examples" from the reply's
"metrics" to weight it; any handler or grid that speaks to them uses these names.
Keys that only FedReptile's server and devices share live in
`tinyfleet.common.reptile_protocol`.
"""

from __future__ import annotations

from typing import Final

ARRAYS_KEY: Final = "arrays"  # the model's weights, both ways
CONFIG_KEY: Final = "config"  # the ConfigRecord of a train or evaluate message
METRICS_KEY: Final = "metrics"  # the MetricRecord of a reply
NUM_EXAMPLES_KEY: Final = "num-examples"  # metric: the weight of a reply in a weighted mean
SERVER_ROUND_KEY: Final = "server-round"  # config: the round a message belongs to
PROXIMAL_MU_KEY: Final = "proximal-mu"  # config: FedProx's μ (flwr.serverapp.strategy.FedProx)
MODEL_KEY: Final = "model"  # config: the zoo model a message's arrays belong to
