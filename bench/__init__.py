"""falcon-align's benchmarks, one harness: `python -m bench <benchmark> ...` (bench/__main__.py lists them).

Every benchmark builds its models, times and writes its result through bench/common.py; bench/results/README.md
gives the schema of each result kind.
"""
