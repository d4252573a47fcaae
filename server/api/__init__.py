"""The JSON API under ``/api/``: errors, request bodies, and the views."""
