#!/usr/bin/env python
"""Source-checkout wrapper of ``mmoe.cli.build_vqa_vocab`` (installed as a console script; see the README)."""

from mmoe.cli.build_vqa_vocab import main

if __name__ == "__main__":
    raise SystemExit(main())
