"""The PostgreSQL adapters and their migrations, for a cluster."""
