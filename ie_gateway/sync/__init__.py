"""Sync stage: anonymise cases and upload them to Azure Blob; pull verified model versions.

``anonymise`` applies PS3.15 Annex E (table in ``profile``) with keyed, consistent UIDs;
``blob`` uploads a case resumably, manifest last; ``updates`` pulls and verifies model versions.
"""
