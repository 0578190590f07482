"""Thin gRPC client for the CodecSight ensemble (tritonclient)."""
