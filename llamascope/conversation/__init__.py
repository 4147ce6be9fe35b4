"""The conversation service: rules, parameters and the request lifecycle, with no HTTP in it."""
