"""dpkit.benchmarks: the benchmark tooling (`dpkit-bench`), a consumer of every stage.

    dpkit-bench --quick                       # latency of every backend on this machine
    python -m dpkit.benchmarks.bench_export        # export time and bundle size
    python -m dpkit.benchmarks.bench_train         # training throughput

Results are written to benchmarks/results/ (not installed with the package).
"""
