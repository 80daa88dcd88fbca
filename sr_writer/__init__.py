"""Pure builders of DICOM result objects from an AnalysisResult."""
