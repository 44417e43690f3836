"""nhigate.k8s."""
