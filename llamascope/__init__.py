"""llamascope: the DashScope multimodal-generation API for Llama 3.2 Vision, on your own hardware."""

__version__ = "0.1.0"
