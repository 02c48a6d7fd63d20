"""Placeholder: being written (registered workload memslot_perf)."""
