# One image for every celery-sagas service (worker, beat, Flower, metrics exporter, migrate):
#   docker compose up          (see docker-compose.yml)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# The package and the example deployment (workers/), installed with the extras the
# deployment uses: Flower and the Prometheus exporter. README.md is the package's readme.
COPY pyproject.toml README.md* ./
COPY celery_sagas ./celery_sagas
COPY workers ./workers
RUN pip install ".[flower,prometheus]" \
    && useradd --create-home --uid 10001 sagas

# Celery refuses to run as root with pickle and warns otherwise: run as a plain user.
# Writable state (beat's schedule file) goes to /tmp.
USER sagas
WORKDIR /home/sagas

EXPOSE 5555 9808
CMD ["celery", "-A", "workers.app", "worker", "-l", "INFO", "-E"]
