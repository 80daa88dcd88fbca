"""The operations API's routers, one per resource; :func:`dicom_node.api.app.create_api` includes them in this order."""
