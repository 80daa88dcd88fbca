"""Who made an object, and what marks demo output: the strings every builder and the node share.

``MANUFACTURER`` goes into (0008,0070) of every object we create; ``dicom_node.pipeline.selection``
reads the same constant to skip our own output (a drift would feed our results back into analysis).
``DEMO_MARK`` is the banner every object made with demo weights carries (series description,
content description, report text, the burned-in SC banner, the KOS description, the demo command).
"""

from __future__ import annotations

from inference.result import NODE_MANUFACTURER

MANUFACTURER = NODE_MANUFACTURER
DEMO_MARK = "DEMO WEIGHTS - NOT FOR CLINICAL USE"
