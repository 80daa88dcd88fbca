"""AnatomiX Node: DICOM networking, state, queue and delivery."""
