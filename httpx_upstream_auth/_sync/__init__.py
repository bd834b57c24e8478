# Generated from _async by tests/unasync_twins.py: do not edit.
"""The sync (blocking) I/O shells, generated from ``_async`` by unasync: edit the source, never these."""
