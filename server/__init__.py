"""tinyfleet.server."""
