"""lorastack's engine: a library that knows nothing of Gradio or HTTP."""

__version__ = "0.1.0"
