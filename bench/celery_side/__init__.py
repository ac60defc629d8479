"""What runs inside `bench/.venv-celery` (Celery is never a project dependency)."""
