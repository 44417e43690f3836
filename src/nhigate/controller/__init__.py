"""nhigate.controller."""
