"""The Files and Batch APIs (OpenAI-compatible, under /compatible-mode/v1 and /v1): HTTP only (see
``llamascope.batch``)."""
