"""The AnatomiX engine: preprocessing, APM, retrieval, language model, tasks."""
