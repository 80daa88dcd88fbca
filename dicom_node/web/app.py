"""The application the HTTP process serves: the operations API with the console under ``/console``."""

from __future__ import annotations

from fastapi import FastAPI

from dicom_node.api.app import create_api
from dicom_node.console import mount
from dicom_node.settings import Settings
from dicom_node.store.base import Store


def create_app(settings: Settings, store: Store) -> FastAPI:
    """The operations API over ``store`` (:func:`dicom_node.api.app.create_api`) with the web console mounted."""
    app = create_api(settings, store)
    mount(app)
    return app
