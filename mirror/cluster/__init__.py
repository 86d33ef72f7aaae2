"""More than one machine: what replicas share through Redis, and the shared S3 tier."""
