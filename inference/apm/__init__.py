"""The anatomy perception module (APM): DETR-style detector, state-dict compatible with AnatomiX."""

from inference.apm.config import APMConfig
from inference.apm.model import APM_OUTPUT_KEYS, AnatomyPerceptionModule, boxes_to_xyxy_model, build_apm

__all__ = ["APMConfig", "APM_OUTPUT_KEYS", "AnatomyPerceptionModule", "boxes_to_xyxy_model", "build_apm"]
