"""The audit trail (``trail``), its DICOM audit messages (``atna``, PS3.15 A.5) and their
forwarding to an ATNA repository as RFC 5424 syslog (``forward``)."""
