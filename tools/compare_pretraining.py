#!/usr/bin/env python
"""Source-checkout wrapper of ``mmoe.cli.compare_pretraining`` (``python -m mmoe.cli.compare_pretraining``)."""

from mmoe.cli.compare_pretraining import main

if __name__ == "__main__":
    main()
