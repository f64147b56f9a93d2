"""The DICOM node: receives CT and RTSTRUCT from a PACS or contouring system (C-STORE), plans
them through the orchestrator by routing rules, and sends the plan dose back (C-STORE)."""
