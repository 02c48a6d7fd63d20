"""Placeholder: being written (registered workload snp_boot)."""
