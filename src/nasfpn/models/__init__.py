"""Model parts: backbone, necks, head, anchors, boxes, losses, post-processing, detector."""

from nasfpn.models.detector import RetinaNet, build_model
from nasfpn.models.nasfpn import FPN_CELLS_GENOTYPE, NASFPN_GENOTYPE, Cell, Genotype, parse_genotype

__all__ = ["FPN_CELLS_GENOTYPE", "NASFPN_GENOTYPE", "Cell", "Genotype", "RetinaNet", "build_model", "parse_genotype"]
