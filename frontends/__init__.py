"""Front ends: the Gradio page, the A1111-compatible HTTP API and the command line.

Each is a client of `pipelines.interface.GenerationService` only, and none imports another.
"""
