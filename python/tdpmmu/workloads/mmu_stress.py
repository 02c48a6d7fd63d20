"""Placeholder: being written (registered workload mmu_stress)."""
