"""Wire contracts of the fleet protocol (.proto) and their generated stubs (tinyfleet.protos.tinyfleet.v1)."""
