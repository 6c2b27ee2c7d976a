"""mmoe.train: the only package that imports Lightning (docs/interfaces.md section 5).

One file per task module: ``pretraining.MaskedPretraining``, ``classification.ClassificationTask`` (VQAv2,
NLVR2, ImageNet), ``captioning.CaptioningTask``, ``detection.DetectionTask``, all on ``base.TaskModule``
(backbone through ``mmoe.model.create_model``, optimizer, checkpoint keys, DDP gather). One file per dataset's
data module under ``mmoe.train.data``. Also the shared optimizer/schedule (``optim``), default callbacks
(``callbacks``), old class paths of saved checkpoints and configs (``compat``) and the ``mmoe`` console script
(``cli.main``). Submodules are imported on use, so ``import mmoe.train.optim`` stays light.
"""
