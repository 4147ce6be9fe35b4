"""The OpenAI-compatible surface (``/compatible-mode/v1``, also at ``/v1``), on the same conversation service."""
