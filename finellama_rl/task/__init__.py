"""What a GSM8K problem is, how it is prompted under each evaluation protocol, and how an answer
is extracted and judged; see docs/ARCHITECTURE.md."""
