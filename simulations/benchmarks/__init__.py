"""tinyfleet.simulations.benchmarks."""
