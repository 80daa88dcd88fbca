"""The Celery application: built from Settings by a factory, never configured at import.

Two queues: ``analyze`` (one worker process per GPU, model loaded once per process) and ``deliver``
(C-STORE to destinations). Only IDs travel through the broker (study UID, version), as JSON.

Brokers:

* production: Redis (``queue.broker_url = "redis://host:6379/0"``);
* embedded default (empty ``broker_url``): kombu's filesystem transport under ``<data_dir>/broker``.
  It needs no server and works across processes on one host (or hosts sharing ``data_dir``). It has
  no acknowledgement: a message is gone once a worker takes it, so the node's dispatch loop
  (:mod:`dicom_node.pipeline.dispatch`) re-queues from the state store whatever a dead worker held.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import ChannelError

from dicom_node.settings import Settings

ANALYZE_QUEUE = "analyze"
DELIVER_QUEUE = "deliver"
QUEUES = (ANALYZE_QUEUE, DELIVER_QUEUE)

#: Task names (stable: producers send by name and need not import the task code).
ANALYZE_TASK = "anatomix.analyze"
DELIVER_TASK = "anatomix.deliver"


def broker_dir(settings: Settings) -> Path:
    """Folder of the embedded filesystem broker (shared by the node and its local workers)."""
    return settings.storage.data_dir.resolve() / "broker"


def broker_settings(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The broker URL and transport options for these settings."""
    url = settings.queue.broker_url
    if url and not url.startswith("filesystem://"):
        # Redis: unacknowledged tasks come back after the visibility timeout, which must exceed
        # the task time limits (validated in settings) or a long analysis would run twice.
        return url, {"visibility_timeout": settings.queue.visibility_timeout_s}
    folder = broker_dir(settings)
    queue_folder, processed = folder / "queue", folder / "processed"
    for path in (queue_folder, processed, folder / "control"):
        path.mkdir(parents=True, exist_ok=True)
    return "filesystem://localhost/", {
        "data_folder_in": str(queue_folder),
        "data_folder_out": str(queue_folder),
        # Taking a message is a rename into this folder: atomic only on the same file system,
        # which is what makes two workers never take the same message.
        "store_processed": True,
        "processed_folder": str(processed),
        "control_folder": str(folder / "control"),
        "polling_interval": 0.2,
    }


def create_app(settings: Settings, name: str = "anatomix-node") -> Celery:
    """A Celery app configured from settings (tasks are registered by :func:`dicom_node.pipeline.tasks.register_tasks`)."""
    url, transport_options = broker_settings(settings)
    app = Celery(name, broker=url, set_as_current=False)
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue=DELIVER_QUEUE,
        task_routes={ANALYZE_TASK: {"queue": ANALYZE_QUEUE}, DELIVER_TASK: {"queue": DELIVER_QUEUE}},
        # JSON only: task arguments are IDs, never pixel data or pickled objects.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        # A task is acknowledged after it ran, so a worker that dies mid-task gives it back;
        # prefetch 1 so one busy worker does not sit on work another could do.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0},
    )
    app.anatomix_settings = settings  # read by the tasks of a worker process
    return app


def queue_depth(app: Celery, queue: str) -> int:
    """Messages waiting in ``queue`` (not those a worker already took)."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        try:
            return channel.queue_declare(queue=queue, passive=True).message_count
        except ChannelError:
            # Redis keeps no empty queue: after a restart (or before the first message) it is unknown.
            return 0


def send_analyze(app: Celery, study_instance_uid: str, version: int) -> None:
    app.send_task(ANALYZE_TASK, args=[study_instance_uid, version], queue=ANALYZE_QUEUE, routing_key=ANALYZE_QUEUE)


def send_deliver(app: Celery, study_instance_uid: str, version: int, countdown: float | None = None) -> None:
    app.send_task(DELIVER_TASK, args=[study_instance_uid, version], queue=DELIVER_QUEUE, routing_key=DELIVER_QUEUE, countdown=countdown)
