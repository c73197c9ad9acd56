"""Diagnostics of fd-method.md §4: attention distance, head diversity, attention maps, loss landscape, plots."""
