#!/usr/bin/env python
"""Source-checkout wrapper of ``mmoe.cli.convert_checkpoint`` (installed as a console script; see the README)."""

from mmoe.cli.convert_checkpoint import main

if __name__ == "__main__":
    raise SystemExit(main())
