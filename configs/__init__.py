"""Bundled settings templates and example jobs (YAML)."""
