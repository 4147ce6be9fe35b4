"""DashScope's text APIs: /api/v1/services/aigc/text-generation/generation and /api/v1/tokenizer."""
