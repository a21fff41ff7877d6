"""Generated from proto/externalscaler.proto by scripts/generate; never edit."""
