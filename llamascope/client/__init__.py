"""A client of the DashScope native API, and ``llamascope chat`` on top of it.

``native`` is the HTTP side (httpx, server-sent events through httpx-sse, one
error type); ``conversation`` the messages and parameters; ``attachment``
turns an image's name into what the API takes; ``display`` shows an answer as
it streams; ``answering`` asks for one answer and shows it; ``chat`` is the
command and ``interactive`` its conversation mode (imports point that way:
chat, interactive, answering). ``batch`` is the ``llamascope batch`` command over
the Files and Batch APIs (``batches``), with ``batch_input`` and ``batch_results``.
Nothing here imports the server's packages.
"""

from llamascope.client.conversation import Conversation
from llamascope.client.native import DEFAULT_BASE_URL, Answer, APIError, Client

__all__ = ["DEFAULT_BASE_URL", "APIError", "Answer", "Client", "Conversation"]
