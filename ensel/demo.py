"""`python -m ensel.demo` is `ensel demo`: see ensel.cli (demo_config) for what it runs."""

from __future__ import annotations

import sys

from .cli import main as _cli_main


def main(argv=None) -> int:
    return _cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
