#!/usr/bin/env python
"""Source-checkout wrapper of ``mmoe.cli.make_synthetic`` (installed as a console script; see the README)."""

from mmoe.cli.make_synthetic import main

if __name__ == "__main__":
    raise SystemExit(main())
