"""The auditor: consumes audit events and stores hashed request metadata in ClickHouse."""
