"""Networks: static (deployable) subnets and the elastic weight-sharing supernet."""

from spaceevo.nn.static import StaticNet, build_static
from spaceevo.nn.supernet import Supernet

__all__ = ["StaticNet", "Supernet", "build_static"]
