"""tinyfleet: federated meta-learning and on-device learning for fleets of small devices."""

import os

# Flower reports usage over the network unless told not to; this machine has none.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__version__ = "0.1.0"
