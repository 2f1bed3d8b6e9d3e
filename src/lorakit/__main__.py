"""`python -m lorakit ...`, as `torchrun -m lorakit train ...` and `accelerate launch -m lorakit ...` run it."""

from lorakit.cli import main

main()
