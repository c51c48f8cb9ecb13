"""`python -m accel ...` is the `accel` command."""

from accel.cli.main import main

raise SystemExit(main())
