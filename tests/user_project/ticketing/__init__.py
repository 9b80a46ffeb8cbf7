"""A ticket shop's Celery app with one saga (the user project of celery-sagas' tests)."""
