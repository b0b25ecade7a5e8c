"""Catalog re-categorization: Ray Data batch inference and Ray Train training for product images."""

__version__ = "0.1.0"
