"""The examples import their shared data loaders (examples/common.py) as a top-level module, as
they do when run as scripts."""

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
