"""Placeholder: being written (registered workload dirty_log_perf)."""
