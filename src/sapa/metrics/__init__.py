"""Metrics of the papers' tables: mIoU and boundary IoU (segmentation), COCO box AP (detection).

States are sums of counts (or lists of detections) that reduce across DDP ranks; see
:mod:`sapa.metrics.segmentation` for the exact mIoU / boundary IoU definitions.
"""
from .detection import COCO_STAT_NAMES, COCOBoxEvaluator
from .segmentation import BoundaryIoU, ConfusionMatrix, SegmentationMetric, boundary_band, dilation_pixels, erode

__all__ = ["ConfusionMatrix", "BoundaryIoU", "SegmentationMetric", "boundary_band", "erode", "dilation_pixels",
           "COCOBoxEvaluator", "COCO_STAT_NAMES"]
