"""The benchmark (`python scripts/bench.py`, `jaxhet-bench`, `python -m hetapps.bench`):
every training loop of both frameworks on the same data, initial weights, precision and
thread count, set against references measured in the same run.

- variants.py: what is timed (a framework's loop with its engine options), each run
  through the train command's own driver (hetcore.driver.train);
- timing.py: the threads, and the repeats round-robin over the variants;
- references.py: the workload, the matmul peak and the matmul floor of each library;
- memory.py: each variant's peak and activation memory;
- report.py: the agreement check (a fast wrong variant fails the benchmark), the table,
  the JSON and the figure;
- sweep.py: points x widths, time and memory against FLOPs per epoch;
- command.py: the options and the run.

Method and figures: docs/performance.md.
"""
