"""The embedded model zoo: the trained models shipped in ``zoo/models/`` (index in :mod:`sensitivity.core.zoo`) and
the script that trained them (:mod:`sensitivity.zoo.train`)."""

from ..core.zoo import ZOO_DIR, ZOO_MODELS, ZooModel, list_models, zoo_path

__all__ = ["ZOO_DIR", "ZOO_MODELS", "ZooModel", "list_models", "zoo_path"]
