"""Benchmark and load tester: ``tokenmill bench serve | compare | plan | throughput``.

The load generator (loadgen, client) produces per-request records; metrics turns them into a summary;
report_* write JSON/CSV/HTML; compare and plan read those JSON files back.
"""
