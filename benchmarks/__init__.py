"""Code beside the package that measures it: `python -m benchmarks.bench` is `make bench`."""
