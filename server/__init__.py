"""loraserve server: config, base model, engine, gRPC services, metrics and CLI."""

__version__ = "0.1.0"
