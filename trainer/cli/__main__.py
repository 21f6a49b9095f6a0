"""`python -m trainer.cli`: the `engram` command without its console script."""
from trainer.cli import main

raise SystemExit(main())
