"""Embedded default models and built-in data sets, all offline."""
