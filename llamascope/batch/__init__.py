"""Batch jobs: the Files and Batch APIs' domain, with no HTTP in it.

- ``records``: a batch's states and what may follow what, ids, the completion window, the views handed out;
- ``lines``: an input file checked line by line as it streams (limits, envelope, one model, unique ids);
- ``files``: the file store under the data directory (inputs, outputs and errors, by file id);
- ``repository``: batches, files and line states in the accounts database (claims with leases);
- ``runner``: takes lines while their engine has room and sends each through the app in process, as the
  batch's key; writes the result files when a batch ends;
- ``caller``: how an in-process request carries the batch's key (an ASGI scope extension);
- ``service``: what the HTTP surface calls.
"""
