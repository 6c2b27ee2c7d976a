"""mmoe.train: the only package that imports Lightning (docs/interfaces.md section 5).

LightningModules (``pretrain.MaskedPretraining``, ``tasks``, ``captioning``, ``vision``), data modules
(``datamodule``, ``task_data``), the shared optimizer/schedule (``optim``), default callbacks (``callbacks``) and the
``mmoe`` console script (``cli.main``). Submodules are imported on use, so ``import mmoe.train.optim`` stays light.
"""
