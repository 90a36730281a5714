"""patcli's benchmarks: ``python -m benchmarks --only SECTION`` (``--list`` names them); results go to BENCHMARKS.md."""
