"""Kernel paths as plain functions over shared-memory records and lock interfaces."""
