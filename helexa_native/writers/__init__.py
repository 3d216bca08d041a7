"""Model writers: GGUF files and block encoders for tests, benchmarks and synthetic models.

The inverse of loaders/: nothing on the inference path imports them.
"""
