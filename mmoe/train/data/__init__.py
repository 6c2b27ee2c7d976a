"""One Lightning data module per dataset, named after it, on the shared base (``base``).

``pretraining.PretrainDataModule`` (image / text / pair webdataset shards), ``vqav2.VQADataModule``,
``nlvr2.NLVR2DataModule``, ``coco_captioning.CaptioningDataModule``, ``imagenet.ImageNetDataModule``,
``coco_detection.CocoDetectionDataModule``. The datasets themselves live in ``mmoe.data``; these modules wire
them into loaders (one vocabulary for the same things, docs/interfaces.md section 5). Submodules are imported
on use.
"""
