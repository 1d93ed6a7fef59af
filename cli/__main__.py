"""`python -m cli`: the same as the `prefect-maintenance` command."""

from cli import main

raise SystemExit(main())
