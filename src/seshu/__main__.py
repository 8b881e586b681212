"""`python -m seshu ...` (and `accelerate launch -m seshu ...` for several GPUs)."""

from seshu.cli import main

main()
