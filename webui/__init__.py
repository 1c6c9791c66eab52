"""Front ends over the engine: the Gradio page and the A1111-compatible HTTP API."""
