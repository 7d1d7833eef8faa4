"""nasfpn: RetinaNet detectors with FPN and NAS-FPN feature pyramids in pure PyTorch."""

from nasfpn import _clock  # noqa: F401  (first: notes the time the imports begin)
from nasfpn.core.config import Config
from nasfpn.core.presets import PRESETS, get_config
from nasfpn.deploy.predictor import Detector, load

__version__ = "0.1.0"

__all__ = ["PRESETS", "Config", "Detector", "__version__", "get_config", "load"]
