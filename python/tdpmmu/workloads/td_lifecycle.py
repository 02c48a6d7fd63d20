"""Placeholder: being written (registered workload td_lifecycle)."""
