"""State shared by lorag replicas in PostgreSQL: connections, versioned migrations, change notifications."""
