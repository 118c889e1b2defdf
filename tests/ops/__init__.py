"""Deployment and observability: what deploy/ ships matches what the service does and exports."""
