"""SQS → validate & mask → PostgreSQL COPY → ack: the wiring, CLI and lifecycle."""
