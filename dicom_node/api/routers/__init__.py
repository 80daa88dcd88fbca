"""The operations API's routers, one per resource; :func:`dicom_node.api.app.create_app` includes them in this order."""
