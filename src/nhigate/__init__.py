"""nhigate: identity-aware proxy and operator for non-human identities."""

__version__ = "0.1.0"
