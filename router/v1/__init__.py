"""Generated gRPC code for the router.v1 API (built from proto/ by setup.py; not edited by hand)."""
