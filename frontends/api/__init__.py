"""The A1111-compatible HTTP API under /sdapi/v1."""
