"""The node's HTTP side as one process: the operations API (:mod:`dicom_node.api`) with the web console
(:mod:`dicom_node.console`) mounted on it, served by uvicorn (:mod:`dicom_node.web.server`).

It sits above both: the console is built on the API's public dependencies and the API knows nothing
of the console, so neither imports the other's assembly.
"""
