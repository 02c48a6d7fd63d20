"""Placeholder: being written (registered workload kvm_page_table)."""
