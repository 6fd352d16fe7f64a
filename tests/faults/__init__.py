"""Helpers of the fault-injection and bad-input tests (tests/test_faults.py, tests/test_bad_input.py)."""
