"""nhigate.cli."""
