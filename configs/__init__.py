"""The shipped YAML files (model sizes, pretraining and fine-tuning recipes) as the package ``mmoe.configs``.

pyproject maps ``mmoe.configs`` to this folder, so an editable install reads these files in place and a
wheel carries them inside the package; ``mmoe.resources`` finds them either way. Nothing to import here.
"""
