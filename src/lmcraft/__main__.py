"""`python -m lmcraft` (also what `torchrun -m lmcraft` runs)."""

from lmcraft.cli import main

raise SystemExit(main())
