"""`python -m lightning_diffusion ...`"""

from lightning_diffusion.cli import main

raise SystemExit(main())
