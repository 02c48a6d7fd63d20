"""Placeholder: being written (registered workload pre_fault_memory)."""
