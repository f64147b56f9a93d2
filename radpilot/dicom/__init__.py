"""DICOM in and out: validated, de-identified CT + RTSTRUCT import; CT/RTSTRUCT/RTDOSE export."""
