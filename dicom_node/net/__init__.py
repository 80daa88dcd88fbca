"""The DICOM port: the Storage/Verification SCP, its connection gate and PDU guard, negotiation,
transfer syntaxes, DICOM TLS and the Part 10 header written in front of each received instance."""
