"""nasfpn: RetinaNet detectors with FPN and NAS-FPN feature pyramids in pure PyTorch."""

from .api import Detector, load
from .config import Config
from .presets import PRESETS, get_config

__version__ = "0.1.0"

__all__ = ["Config", "Detector", "PRESETS", "get_config", "load", "__version__"]
