"""Harnesses that prove reliability claims against a real server subprocess (docs/RELIABILITY.md).

Each has a short version run by pytest (tests/e2e/test_fuzz.py, test_crash.py, test_load.py)
and a long version in bench/ (fuzz_bench.py, crash_bench.py, load_bench.py); both drive the
same code here, so the figures in the docs come from the harness CI keeps honest.
"""
