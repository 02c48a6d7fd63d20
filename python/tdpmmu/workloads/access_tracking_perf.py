"""Placeholder: being written (registered workload access_tracking_perf)."""
