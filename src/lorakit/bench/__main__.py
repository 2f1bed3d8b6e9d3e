"""`python -m lorakit.bench [--suite ...]`: the bench without the lorakit CLI."""

from __future__ import annotations

import argparse
import sys

from .command import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m lorakit.bench", description="lorakit vs PEFT benchmarks")
add_arguments(parser)
sys.exit(main(parser.parse_args()))
