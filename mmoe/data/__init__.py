"""mmoe.data: files to batches (tokenizers, transforms, masking, webdataset shards, synthetic world).

No model code lives here (ARCHITECTURE.md). Task datasets (vqa, nlvr2, captions, imagenet, coco) are
imported from their own modules; this package only re-exports the shared building blocks.
"""

from mmoe.data.tokenizer import Tokenizer, build_tokenizer, tokenizer_from_spec
from mmoe.data.transforms import BEIT3_MEAN, BEIT3_STD, build_transform, denormalize

__all__ = [
    "BEIT3_MEAN",
    "BEIT3_STD",
    "Tokenizer",
    "build_tokenizer",
    "build_transform",
    "denormalize",
    "tokenizer_from_spec",
]
