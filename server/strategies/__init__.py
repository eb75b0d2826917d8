"""Server-side federated strategies written on Flower's strategy API."""

from tinyfleet.server.strategies.fedproto import FedProto
from tinyfleet.server.strategies.fedreptile import FedReptile

__all__ = ["FedProto", "FedReptile"]
