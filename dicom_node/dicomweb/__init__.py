"""DICOMweb (PS3.18) on the node's HTTP service: STOW-RS receive, QIDO-RS/WADO-RS, destinations (issue 23)."""
