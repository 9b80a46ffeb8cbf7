"""Test helpers: throwaway databases (``databases``) and real Celery processes (``processes``)."""
