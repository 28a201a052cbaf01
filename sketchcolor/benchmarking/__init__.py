"""Benchmark and verification machinery shared by ``sketchcolor bench``, ``sketchcolor verify``
and the benchmarks/ suites: cases (what runs), timing, peak memory, the bench loop and reports."""
