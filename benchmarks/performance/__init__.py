"""`python -m benchmarks`: the service against its in-process ceiling and its baselines (throughput,
latency, memory, CPU per image), and the performance targets and report."""
