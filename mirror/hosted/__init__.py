"""Hosted namespaces: what clients push to the mirror, kept beside what it caches."""
