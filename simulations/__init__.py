"""tinyfleet.simulations."""
