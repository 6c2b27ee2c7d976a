"""mmoe.data: files to batches (tokenizers, transforms, masking, webdataset shards, synthetic world).

No model code lives here (docs/interfaces.md, layout). Task datasets (vqa, nlvr2, captions, imagenet, coco) are
imported from their own modules; the offline shard writer from ``mmoe.data.shard_writer``, the training-time
shard reader from ``mmoe.data.shard_reader`` and the shapes world from ``mmoe.data.synthetic``. This package
re-exports only the small shared building blocks.
"""

from mmoe.data.masking import IGNORE_INDEX, BlockMaskGenerator, mask_tokens
from mmoe.data.tokenizer import Tokenizer, build_tokenizer, tokenizer_from_spec
from mmoe.data.transforms import BEIT3_MEAN, BEIT3_STD, build_transform, denormalize

__all__ = [
    "BEIT3_MEAN",
    "BEIT3_STD",
    "IGNORE_INDEX",
    "BlockMaskGenerator",
    "Tokenizer",
    "build_tokenizer",
    "build_transform",
    "denormalize",
    "mask_tokens",
    "tokenizer_from_spec",
]
