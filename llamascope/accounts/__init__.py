"""Who may call: API keys today; grants, allowances and the usage ledger later.

Knows nothing of HTTP: the surfaces hand it the Authorization header's value
and get a decision back.
"""
