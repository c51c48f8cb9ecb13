"""The `accel` command line: `accel launch`, `accel env` (see `accel --help`)."""
