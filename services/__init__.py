"""Services: Ray actors, the driver loop, CLI, config and metrics."""
