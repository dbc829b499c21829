"""Servers a user would pick instead of convserve, run beside it in the same benchmark, and parity checks
against them."""
