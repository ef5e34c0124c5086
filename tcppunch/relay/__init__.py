"""The relay byte pump (splice where possible)."""
