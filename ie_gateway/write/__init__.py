"""Write stage: label map on the CT grid → RT-STRUCT and DICOM-SEG, and their checks (the QA
image is drawn by ``ie_gateway.pictures``).

The caller makes the output UIDs once (:func:`new_output_uids`) and stores them, so every
delivery retry sends the same instance; builders never make UIDs of their own.
"""

from ie_gateway.imaging import StructureInfo, make_masks, structure_mask
from ie_gateway.store.records import OutputUIDs
from ie_gateway.write.common import ModelInfo, new_output_uids
from ie_gateway.write.rtstruct import build_rtstruct
from ie_gateway.write.seg import build_seg
from ie_gateway.write.validate import rasterize_rtstruct, validate_rtstruct, validate_seg

__all__ = [
    "ModelInfo",
    "OutputUIDs",
    "StructureInfo",
    "build_rtstruct",
    "build_seg",
    "make_masks",
    "new_output_uids",
    "rasterize_rtstruct",
    "structure_mask",
    "validate_rtstruct",
    "validate_seg",
]
