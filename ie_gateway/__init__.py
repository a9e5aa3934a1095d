"""ie_gateway: a DICOM node that brings AI auto-contouring into the radiotherapy workflow."""

__version__ = "0.1.0"
