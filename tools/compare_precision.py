#!/usr/bin/env python
"""Source-checkout wrapper of ``mmoe.cli.compare_precision`` (``python -m mmoe.cli.compare_precision``)."""

from mmoe.cli.compare_precision import main

if __name__ == "__main__":
    main()
