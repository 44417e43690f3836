"""nhigate.api."""
