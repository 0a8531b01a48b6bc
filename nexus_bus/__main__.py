"""`python -m nexus_bus` is the `nexus-bus` command."""

from nexus_bus.cli import main

raise SystemExit(main())
