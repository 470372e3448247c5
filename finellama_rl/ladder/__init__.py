"""The OOM ladder's shared pieces; see docs/ARCHITECTURE.md."""
