"""tinyfleet.client."""
