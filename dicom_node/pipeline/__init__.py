"""From a stored instance to delivered results: study assembly, selection, dispatch to the Celery
queue, analysis (single and batched), the worker tasks, routing rules, delivery and retention."""
