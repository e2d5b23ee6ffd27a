"""The controller: scales app-tier instances 0..15 on request-queue depth."""
