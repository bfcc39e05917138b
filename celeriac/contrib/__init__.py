"""Optional helpers that are not part of the core API."""
