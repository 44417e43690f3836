"""nhigate.proxy."""
