"""Code shared by every tier: configuration, names, message format, AWS clients."""
