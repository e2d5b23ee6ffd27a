"""The controller: scales app-tier instances from 0 to MAX_INSTANCES (15) on request-queue depth."""
