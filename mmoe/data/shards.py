"""Alias of the shard writer and reader under their former module name, for callers not yet moved.

The offline writer lives in ``mmoe.data.shard_writer`` and the training-time reader in
``mmoe.data.shard_reader``; import from those. This module only re-exports their public names.
"""

from mmoe.data.shard_reader import (
    ShardStream,
    SkipCounters,
    StreamConfig,
    StreamLoader,
    expand_patterns,
    read_shard,
    swap_left_right,
)
from mmoe.data.shard_writer import (
    ShardWriter,
    SkipReport,
    iter_coco_captions,
    iter_image_folder,
    iter_pair_list,
    iter_text_files,
    read_sizes,
    validate_image,
    write_shards,
)

__all__ = [
    "ShardStream",
    "ShardWriter",
    "SkipCounters",
    "SkipReport",
    "StreamConfig",
    "StreamLoader",
    "expand_patterns",
    "iter_coco_captions",
    "iter_image_folder",
    "iter_pair_list",
    "iter_text_files",
    "read_shard",
    "read_sizes",
    "swap_left_right",
    "validate_image",
    "write_shards",
]
