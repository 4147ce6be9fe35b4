"""The DashScope native surface: /api/v1/services/aigc/multimodal-generation/generation."""
