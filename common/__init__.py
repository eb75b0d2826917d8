"""tinyfleet.common."""
