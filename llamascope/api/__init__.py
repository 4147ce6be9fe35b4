"""The HTTP surfaces. Everything that knows about HTTP lives here, nothing below it does."""
