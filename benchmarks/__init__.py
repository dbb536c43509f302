"""On-demand performance benchmarks (``python -m benchmarks.run``); not collected by pytest."""
