"""Diagnostics of docs/method.md §4: attention distance, head diversity, attention maps, loss landscape, plots."""
