"""DICOM services beyond the core flow: storage commitment, DICOMweb (STOW-RS in and out),
query/retrieve from a source, and the conformance statement that describes them all."""
