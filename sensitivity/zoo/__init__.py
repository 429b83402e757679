"""The embedded model zoo: the trained models shipped in ``zoo/models/`` (index in :mod:`sensitivity.core.zoo`) and
the script that trained them (:mod:`sensitivity.zoo.train`)."""

from .._lazy import exports

__all__ = ["ZOO_DIR", "ZOO_MODELS", "ZooModel", "list_models", "zoo_path"]

_EXPORTS = {
    "ZOO_DIR": "..core.zoo",
    "ZOO_MODELS": "..core.zoo",
    "ZooModel": "..core.zoo",
    "list_models": "..core.zoo",
    "zoo_path": "..core.zoo",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS)
