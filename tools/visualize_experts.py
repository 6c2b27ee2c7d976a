#!/usr/bin/env python
"""Source-checkout wrapper of ``mmoe.cli.visualize_experts`` (installed as a console script; see the README)."""

from mmoe.cli.visualize_experts import main

if __name__ == "__main__":
    raise SystemExit(main())
