#!/usr/bin/env python
"""Source-checkout wrapper of ``mmoe.cli.build_visual_codebook`` (installed as a console script; see the README)."""

from mmoe.cli.build_visual_codebook import main

if __name__ == "__main__":
    raise SystemExit(main())
