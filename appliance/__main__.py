"""`python -m appliance`: the CLI (appliance.cli)."""

from .cli import main

raise SystemExit(main())
